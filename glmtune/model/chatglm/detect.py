"""Is a directory an original THUDM ChatGLM checkpoint, and which version (1, 2 or 3)?

Read from the files alone, before anything is loaded and without running the
checkpoint's own Python: config.json says ``model_type: chatglm``; ChatGLM-6B (v1)
has ``position_encoding_2d``; ChatGLM2-6B and ChatGLM3-6B have identical config keys
and the same ``tokenizer.model``, so the tokenizer code shipped beside them (read as
text: v3's lists the ``<|user|>`` role token) or the repo name tells them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError

TOKENIZER_CODE = "tokenization_chatglm.py"


def is_chatglm(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") == "chatglm"


def version_from_config(config: Mapping[str, Any], model_dir: str | Path | None = None,
                        name: str = "") -> int:
    """1, 2 or 3 for a ``model_type: chatglm`` config (the dict of its config.json)."""
    if "position_encoding_2d" in config or not ("multi_query_attention" in config
                                                 or "kv_channels" in config):
        return 1  # old v1 configs predate both v2 keys
    if model_dir is not None:
        code = Path(model_dir) / TOKENIZER_CODE
        try:
            if "<|user|>" in code.read_text(encoding="utf-8", errors="replace"):
                return 3
        except OSError:
            pass  # no tokenizer code beside the weights: fall back to the names
    names = [name, str(config.get("_name_or_path") or "")]
    if model_dir is not None:
        names.append(str(model_dir))
        names.append(_tokenizer_config_name(Path(model_dir)))
    return 3 if any("chatglm3" in n.lower() for n in names) else 2


def _tokenizer_config_name(model_dir: Path) -> str:
    import json

    try:
        data = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("name_or_path") or "") if isinstance(data, dict) else ""


def check_not_prequantized(config: Mapping[str, Any], model_dir: str | Path) -> None:
    """THUDM's -int4 / -int8 checkpoints store weights packed for their own CUDA kernels."""
    bits = config.get("quantization_bit")
    if bits:
        raise GlmtuneError(
            f"{Path(model_dir) / 'config.json'}: quantization_bit: {bits} — this is a "
            f"pre-quantized ChatGLM checkpoint (int{bits}), whose packed weights only THUDM's "
            "own kernels read; use the full checkpoint (e.g. THUDM/chatglm3-6b instead of "
            "chatglm3-6b-int4) with --quant 4bit, which quantizes it as it loads")


def chatglm_version(model_dir: str | Path, config: Mapping[str, Any]) -> int | None:
    """The ChatGLM version of a local checkpoint directory, or None if it is not one."""
    if not is_chatglm(config):
        return None
    check_not_prequantized(config, model_dir)
    return version_from_config(config, model_dir)
