"""Attach LoRA adapters to a base model."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

from glmtune.errors import GlmtuneError
from glmtune.model.family import MOE_MODEL_TYPES, Family

log = logging.getLogger(__name__)


def embedding_module_names(model) -> list[str]:
    """Names of the input-embedding and output-head modules, whatever the architecture calls them."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None}
    names = []
    for name, module in model.named_modules():
        if id(module) in wanted:
            names.append(name.rsplit(".", 1)[-1])
            wanted.discard(id(module))
    return names


def target_modules(family: Family, requested: str):
    if requested and requested != "auto":
        if requested.strip().lower() == "all-linear":  # PEFT's shorthand works only as a string
            return "all-linear"
        return [name.strip() for name in requested.split(",") if name.strip()]
    targets = family.lora_targets
    return targets if isinstance(targets, str) else list(targets)


@contextmanager
def v5_target_names(model):
    """Within, PEFT takes a GLM MoE model's target names as they are.

    PEFT 0.21 rewrites ``gate_proj`` / ``up_proj`` / ``down_proj`` on transformers-5 MoE
    models into the routed experts' fused weights, which is what those names meant under
    transformers 4 (each expert a module of that name), and drops them as modules: the
    dense MLP and the shared experts would go untrained and the experts trained unasked,
    and an adapter saved here would load onto other weights. Our names are already
    transformers 5's, so the rewrite is skipped, when the adapter is made and when loaded.
    """
    from peft.utils import transformers_weight_conversion as conversion

    if getattr(getattr(model, "config", None), "model_type", None) not in MOE_MODEL_TYPES:
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def expert_parameters(model, family: Family, experts: bool) -> list[str] | None:
    """The routed-expert weights to adapt: only when asked, and only where the model has them."""
    if not experts:
        return None
    names = {name for name, _ in model.named_parameters()}
    wanted = [p for p in family.expert_parameters if any(n.endswith("." + p) for n in names)]
    if not wanted:
        raise GlmtuneError(f"lora_experts: this model ({family.name}) has no routed experts "
                           "to adapt; drop --lora-experts")
    return wanted


def describe_targets(peft_model) -> str:
    """What LoRA was put on, by name, with counts: ``q_proj x2, experts.down_proj x1``."""
    from collections import Counter

    counts: Counter = Counter()
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        parts = [p for p in name.split(".") if p != "base_layer"]  # nested expert wrappers
        parameter = getattr(module, "parameter_name", None)  # PEFT's wrapper of a 3-D weight
        if parameter:
            counts[f"{parts[-1]}.{parameter}"] += 1
        else:  # shared experts named apart from the dense MLP's projections
            counts[".".join(parts[-2:]) if parts[-2:-1] == ["shared_experts"] else parts[-1]] += 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def attach_lora(model, family: Family, *, r: int, alpha: int, dropout: float, targets: str,
                train_embeddings: bool, experts: bool = False):
    from peft import LoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules(family, targets),
        target_parameters=expert_parameters(model, family, experts),
        modules_to_save=embedding_module_names(model) if train_embeddings else None,
        # trained copies of tied embeddings must stay one matrix, as in the base
        ensure_weight_tying=tied and train_embeddings)
    try:
        with v5_target_names(model):
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise GlmtuneError(f"target_modules: {exc}".splitlines()[0]
                           + "; pass module names that exist in this model with --target-modules") from exc
    import torch

    # Optimizer updates are far smaller than bf16's resolution: whatever the
    # base dtype, what we train lives in float32.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    log.info("LoRA on %s", describe_targets(peft_model))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


def check_adapter_config(adapter_dir) -> dict:
    """``adapter_config.json`` read and checked before peft sees it (peft answers a broken
    one with a TypeError or KeyError from deep inside)."""
    import json
    from pathlib import Path

    from peft import PeftType

    from glmtune.errors import excerpt, reading

    file = Path(adapter_dir) / "adapter_config.json"
    expected = 'a JSON object like {"peft_type": "LORA", "r": 16, "lora_alpha": 32, ...}'
    with reading(file, expected):
        config = json.loads(file.read_text(encoding="utf-8"))
    problems = []
    if not isinstance(config, dict):
        problems.append(f"top level is a JSON {type(config).__name__}")
        config = {}
    kinds = [t.value for t in PeftType]
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in kinds:
        problems.append(f"peft_type {excerpt(peft_type)} is not a PEFT method (e.g. LORA)")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r is {excerpt(r)}, not a positive integer")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        problems.append(f"lora_alpha is {excerpt(alpha)}, not a number")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules is {excerpt(targets)}, not a list of module names")
    if problems:
        raise GlmtuneError(f"{file}: broken adapter config: {'; '.join(problems)} "
                           f"(expected {expected})")
    return config


def add_embedding_noise(model, alpha: float) -> None:
    """NEFTune (Jain et al., 2023): noise on the input embeddings in training mode only.

    Uniform in +-alpha / sqrt(sequence length x hidden size); it works against
    memorising the training rows, which small data sets invite.
    """
    import torch

    def add_noise(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    model.get_input_embeddings().register_forward_hook(add_noise)
