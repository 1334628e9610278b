"""THUDM's original ChatGLM checkpoints (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B), loaded natively.

Their published Python does not run under current transformers and never runs here:
v2 / v3 are transformers' ``GlmForCausalLM`` once their tensors are renamed and
``query_key_value`` is split (convert.py, while loading); v1 has a model class of its
own (v1_model.py). The tokenizers are rebuilt from ``tokenizer.model`` /
``ice_text.model`` with THUDM's ids (tokenizer.py, v1_tokenizer.py).
"""

from __future__ import annotations

from pathlib import Path

from glmtune.errors import GlmtuneError


def _v1_missing(what: str, exc: ImportError) -> GlmtuneError:
    return GlmtuneError(f"ChatGLM-6B (v1) checkpoints are not yet supported by this glmtune "
                        f"({what} unavailable: {exc}); ChatGLM2-6B and ChatGLM3-6B are")


def load_tokenizer(model_dir: str | Path, version: int):
    if version == 1:
        try:
            from glmtune.model.chatglm.v1_tokenizer import ChatGLM1Tokenizer
        except ImportError as exc:
            raise _v1_missing("its tokenizer", exc) from exc
        return ChatGLM1Tokenizer.from_dir(model_dir)
    from glmtune.model.chatglm.tokenizer import ChatGLMTokenizer

    return ChatGLMTokenizer.from_dir(model_dir, version)


def load_model(model_dir: str | Path, version: int, **load_kwargs):
    """The model, ready for LoRA: ``load_kwargs`` as for ``from_pretrained`` (dtype,
    quantization_config, device_map)."""
    if version == 1:
        try:
            from glmtune.model.chatglm.v1_model import load_v1
        except ImportError as exc:
            raise _v1_missing("its model class", exc) from exc
        return load_v1(model_dir, **load_kwargs)
    from glmtune.model.chatglm.convert import load_glm

    return load_glm(model_dir, **load_kwargs)
