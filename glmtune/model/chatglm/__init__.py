"""THUDM's original ChatGLM checkpoints (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B), loaded natively.

Their published Python does not run under current transformers and never runs here:
v2 / v3 are transformers' ``GlmForCausalLM`` once their tensors are renamed and
``query_key_value`` is split (convert.py, while loading); v1 has a model class of its
own (v1_model.py). The tokenizers are rebuilt from ``tokenizer.model`` /
``ice_text.model`` with THUDM's ids (tokenizer.py, v1_tokenizer.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from glmtune.errors import GlmtuneError


@contextmanager
def _v1_import(what: str):
    """Importing a v1 part: if it fails, v2 / v3 still work, so say which model is out."""
    try:
        yield
    except ImportError as exc:
        raise GlmtuneError(f"ChatGLM-6B (v1) checkpoints are not yet supported by this glmtune "
                           f"({what} unavailable: {exc}); ChatGLM2-6B and ChatGLM3-6B are") from exc


def load_tokenizer(model_dir: str | Path, version: int):
    if version == 1:
        with _v1_import("its tokenizer"):
            from glmtune.model.chatglm.v1_tokenizer import ChatGLM1Tokenizer
        return ChatGLM1Tokenizer.from_dir(model_dir)
    from glmtune.model.chatglm.tokenizer import ChatGLMTokenizer

    return ChatGLMTokenizer.from_dir(model_dir, version)


def load_model(model_dir: str | Path, version: int, **load_kwargs):
    """The model, ready for LoRA: ``load_kwargs`` as for ``from_pretrained`` (dtype,
    quantization_config, device_map)."""
    if version == 1:
        with _v1_import("its model class"):
            from glmtune.model.chatglm.v1_model import load_v1
        return load_v1(model_dir, **load_kwargs)
    from glmtune.model.chatglm.convert import load_glm

    return load_glm(model_dir, **load_kwargs)


# --- export in the base's own layout ---------------------------------------------

def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in (
        "model.safetensors.index.json", "pytorch_model.bin.index.json")


def save_original(model, base_dir: str | Path, out: str | Path, dtype) -> list[str]:
    """Write ``model`` (a ChatGLM base, adapter merged: v1's own class, v2/3 as
    GlmForCausalLM) in THUDM's layout: every non-weight file of ``base_dir`` copied unchanged (config.json,
    tokenizer files, THUDM's *.py), the weights under THUDM's tensor names as
    safetensors shards. Tensors the model does not hold (the stored rotary
    ``inv_freq``) are copied from the base. Returns the files copied."""
    import json
    import shutil

    from glmtune.model.chatglm import convert, weights

    base_dir, out = Path(base_dir), Path(out)
    copied = []
    for file in sorted(base_dir.iterdir()):
        if file.is_file() and not is_weight_file(file.name):
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    state = model.state_dict()
    if not _is_v1(model):  # v1's parameters already carry THUDM's tensor names
        state = convert.to_original(state)
    tensors, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().to(dtype)
        if tensor.data_ptr() in seen:  # v1's tied head: safetensors keeps no shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    for name, tensor in weights.iter_tensors(base_dir):
        if name not in tensors:
            tensors[name] = tensor.clone()
    weights.write_shards(out, tensors)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    return copied


def adapter_original(peft_model) -> tuple[dict, dict]:
    """(tensors, adapter_config) of the adapter under THUDM's module names: LoRA on q/k/v
    becomes rank 3r on ``query_key_value`` (see convert.adapter_to_original); other
    targets keep rank r. Take it before merging: merging unloads the LoRA layers."""
    from peft import get_peft_model_state_dict

    from glmtune.model.chatglm import convert

    config = peft_model.peft_config["default"]
    state = get_peft_model_state_dict(peft_model)
    if _is_v1(peft_model):
        # v1 keeps THUDM's modules (query_key_value is one Linear): the adapter already is
        # in the original layout; only its config is rewritten for the older PEFTs.
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        saved = list(config.modules_to_save or [])
        embeddings = "base_model.model.transformer.word_embeddings.weight"
        head = "base_model.model.lm_head.weight"
        if embeddings in tensors:
            # A trained copy of the tied embeddings may be saved once; the older PEFTs
            # would leave THUDM's head on the untrained matrix: the head gets its copy.
            tensors.setdefault(head, tensors[embeddings].clone())
            saved += [] if "lm_head" in saved else ["lm_head"]
        return tensors, _adapter_config(config, list(config.target_modules), saved)
    tensors, rank3 = convert.adapter_to_original(state, config.r)
    factor = 3 ** 0.5 if config.use_rslora else 3  # keeps alpha / r (or alpha / sqrt r) per module
    names = {"q_proj": "query_key_value", "k_proj": "query_key_value",
             "v_proj": "query_key_value", "o_proj": "dense", "gate_up_proj": "dense_h_to_4h",
             "down_proj": "dense_4h_to_h", "embed_tokens": "word_embeddings",
             "lm_head": "output_layer"}
    data = _adapter_config(config, [names.get(m, m) for m in config.target_modules],
                           [names.get(m, m) for m in config.modules_to_save or []])
    data["rank_pattern"] = {"query_key_value": rank3}
    data["alpha_pattern"] = {"query_key_value": config.lora_alpha * factor}
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, data


def _adapter_config(config, target_modules, modules_to_save) -> dict:
    # Only keys every PEFT since 0.6 knows (rank_pattern / alpha_pattern came in 0.6):
    # this file is for the older stacks that run THUDM's code.
    data = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
            "base_model_name_or_path": str(config.base_model_name_or_path or ""),
            "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "bias": config.bias, "fan_in_fan_out": False,
            "target_modules": sorted(set(target_modules)),
            "modules_to_save": sorted(set(modules_to_save or [])) or None}
    if config.use_rslora:
        data["use_rslora"] = True
    return data


def _is_v1(model) -> bool:
    from glmtune.model.chatglm.v1_model import ChatGLM1Config

    return isinstance(model.config, ChatGLM1Config)


def write_adapter(out: str | Path, tensors: dict, config: dict) -> None:
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8")
