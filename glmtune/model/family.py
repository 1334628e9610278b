"""Which member of the ChatGLM family (or which other causal LM) a checkpoint is.

The family decides the prompt format, the LoRA target modules and whether the
checkpoint ships its own modeling code. Detection reads only the directory's files
(config.json; for ChatGLM2 vs 3 the tokenizer), so it runs before any weights are
loaded. THUDM's ChatGLM checkpoints are loaded natively (glmtune.model.chatglm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from glmtune.model.chatglm import detect as chatglm_detect
from glmtune.tokens import token_id

CHATGLM_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
GLM4_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# GLM-4.5 / 4.6 / 4.7 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite, MLA attention): attention,
# the dense MLP of the first layers and the shared experts, which all share these names. The
# router (``mlp.gate``) is left out: adapting it shifts which experts see which tokens.
GLM4_MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GLM4_MOE_LITE_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                         "o_proj", "gate_proj", "up_proj", "down_proj")
# The routed experts are 3-D parameters, not Linear modules: PEFT adapts them through
# ``target_parameters``, and only with --lora-experts.
MOE_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_MODEL_TYPES = {"glm4_moe": GLM4_MOE_TARGETS, "glm4_moe_lite": GLM4_MOE_LITE_TARGETS}
# transformers models whose attention reads restarting position ids (with no attention mask)
# as row boundaries, so packed rows train as if alone: tests/train/test_loss.py checks each;
# --packing warns for any other.
# ChatGLM2/3 load as "glm"; ChatGLM-6B's own attention and remote code are not among them.
PACKED_ROWS_MODEL_TYPES = {"glm", "glm4", "glm4_moe", "glm4_moe_lite", "llama", "qwen2"}


def keeps_packed_rows_apart(model) -> bool:
    """Whether ``model`` (loaded, PEFT-wrapped or not) trains packed rows as if alone."""
    return getattr(model.config, "model_type", None) in PACKED_ROWS_MODEL_TYPES


@dataclass(frozen=True)
class Family:
    name: str                            # chatglm1-3, glm, glm4, glm4_moe, glm4_moe_lite or generic
    template: str                        # one of config.TEMPLATES
    lora_targets: tuple[str, ...] | str  # module names, or a PEFT shorthand like "all-linear"
    remote_code: bool                    # the checkpoint's own Python code builds the model
    expert_parameters: tuple[str, ...] = ()  # routed-expert weights --lora-experts adapts (MoE)


def _as_dict(model_config: Any) -> dict[str, Any]:
    if isinstance(model_config, Mapping):
        return dict(model_config)
    to_dict = getattr(model_config, "to_dict", None)
    if callable(to_dict):
        # to_dict holds exactly the keys the checkpoint set, unlike getattr on a config
        # object, which falls back to class defaults.
        return to_dict()
    raise TypeError(f"expected a model config or a dict, got {type(model_config).__name__}")


def _chatglm_version(config: dict[str, Any], tokenizer, name_or_path: str) -> int:
    path = Path(name_or_path) if name_or_path else None
    version = chatglm_detect.version_from_config(
        config, path if path is not None and path.is_dir() else None, name_or_path)
    # ChatGLM2 and 3 share their architecture and config keys; a v3 tokenizer has role tokens.
    if version == 2 and tokenizer is not None and token_id(tokenizer, "<|user|>") is not None:
        return 3
    return version


def _native_model_type(model_type: str) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - layout of a future transformers
        return True
    return model_type in CONFIG_MAPPING_NAMES


def detect_family(model_config, tokenizer=None, name_or_path: str = "") -> Family:
    config = _as_dict(model_config)
    model_type = str(config.get("model_type") or "")
    if model_type == "chatglm":
        # Loaded natively (glmtune.model.chatglm): v2/v3 become GlmForCausalLM, v1 keeps
        # THUDM's module names in a class of our own. No remote code either way.
        version = _chatglm_version(config, tokenizer, str(name_or_path))
        targets = CHATGLM_TARGETS if version == 1 else GLM4_TARGETS
        return Family(f"chatglm{version}", f"chatglm{version}", targets, False)
    if model_type in MOE_MODEL_TYPES:
        return Family(model_type, "glm45", MOE_MODEL_TYPES[model_type], False,
                      MOE_EXPERT_PARAMETERS)
    if model_type in ("glm", "glm4"):
        return Family(model_type, "glm4", GLM4_TARGETS, False)
    template = "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
    # Custom code only runs when transformers cannot build the architecture itself.
    remote = "auto_map" in config and not (model_type and _native_model_type(model_type))
    return Family("generic", template, "all-linear", remote)


def template_override(family: Family, template: str) -> Family:
    # The config has checked the name (data.templates.check_template).
    return replace(family, template=template)
