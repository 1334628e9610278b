"""Find, check and load a base model and its tokenizer.

Safety rules live here: a directory's own Python code runs only when the user
passed ``--trust-remote-code`` (never an interactive prompt), safetensors are
preferred, and pickled weights are only read with ``weights_only=True``
(transformers 5 enforces it; we never call ``torch.load`` on model files
ourselves).
"""

from __future__ import annotations

import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError, describe_load_failure
from glmtune.model import tiny_glm
from glmtune.model.chatglm import detect as chatglm
from glmtune.model.files import read_json_object

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Where a model comes from, known before anything heavy is loaded."""

    name: str             # what the user asked for
    path: str             # local directory or hub id handed to from_pretrained
    config: dict[str, Any]  # config.json as a dict ({} for hub ids not cached locally)
    local: bool
    chatglm: int | None = None  # 1, 2 or 3: an original THUDM ChatGLM checkpoint, loaded natively

    @property
    def needs_remote_code(self) -> bool:
        return "auto_map" in self.config and self.chatglm is None


def resolve(model: str, *, build_tiny: bool = True) -> ModelSource:
    """Turn ``--model`` into a checked source; builds tiny-glm on first use."""
    if model == tiny_glm.NAME:
        path = tiny_glm.build() if build_tiny else tiny_glm.default_dir()
        return ModelSource(model, str(path), _read_config(path), True)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GlmtuneError(f"{path}: not a model directory (no config.json); expected a "
                               "Hugging Face model folder with config.json, weights and tokenizer")
        config = _read_config(path)
        return ModelSource(model, str(path), config, True, chatglm.chatglm_version(path, config))
    if path.exists():
        raise GlmtuneError(f"{path}: is a file; --model expects a model directory or a hub id")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        raise GlmtuneError(f"{model}: model directory not found (expected a local Hugging Face "
                           "model folder, 'tiny-glm', or a hub id like THUDM/chatglm3-6b)")
    cached = _cached_chatglm(model)
    return cached or ModelSource(model, model, {}, False)


def _cached_chatglm(repo_id: str) -> ModelSource | None:
    """A THUDM ChatGLM repo already in the local hub cache, as the directory it is there.

    Only its files tell glmtune how to load it natively; looking costs no network.
    """
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub, a malformed id: the hub path decides
        return None
    if not (path / "config.json").is_file():
        return None
    config = _read_config(path)
    version = chatglm.chatglm_version(path, config)
    return ModelSource(repo_id, str(path), config, True, version) if version else None


def _read_config(path: Path) -> dict[str, Any]:
    return read_json_object(Path(path) / "config.json", "model config")


def check_remote_code(source: ModelSource, trust_remote_code: bool,
                      recorded_in: str | None = None) -> None:
    """Refuse remote code unless asked, instead of letting transformers prompt on stdin.

    ``recorded_in``: the adapter directory the base model was named by; what an
    adapter records is never a permission, so the message says whose code it is.
    """
    if source.needs_remote_code and not trust_remote_code:
        kind = source.config.get("model_type", "this model")
        if recorded_in is not None:
            raise GlmtuneError(
                f"{recorded_in}: the adapter's recorded base model {source.path} ('{kind}') "
                "ships its own Python code (auto_map in config.json); an adapter cannot allow "
                "that code to run. If you trust that model, add --trust-remote-code to this "
                "command; otherwise pass --model with a base you trust")
        raise GlmtuneError(
            f"{source.path}: '{kind}' ships its own Python code (auto_map in config.json), "
            "which glmtune runs only when you allow it: add --trust-remote-code "
            "(Make: TRUST_REMOTE_CODE=1, YAML: trust_remote_code: true)")


def load_tokenizer(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoTokenizer

    check_remote_code(source, trust_remote_code)
    if source.chatglm is not None:
        from glmtune.model import chatglm as chatglm_native

        return chatglm_native.load_tokenizer(source.path, source.chatglm)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise GlmtuneError(f"{source.path}: could not load the tokenizer ({_first_line(exc)}); "
                           "expected tokenizer files (tokenizer.json or tokenizer.model with "
                           "tokenizer_config.json) in the model directory") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere; any id will do, eos is the convention.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def quantization_config(quant: str, compute_bf16: bool, shardable: bool = False):
    """bitsandbytes settings for ``--quant``: nf4 with double quantization, or int8.

    ``shardable``: store the packed 4-bit weights as bf16 so FSDP / ZeRO-3 can
    shard them (they only shard floating-point tensors).
    """
    if quant == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise GlmtuneError(f"quant: --quant {quant} needs bitsandbytes: pip install "
                           "'bitsandbytes>=0.45' (or use --quant none)") from exc
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if compute_bf16 else torch.float32,
        **({"bnb_4bit_quant_storage": torch.bfloat16} if shardable else {}))


@contextmanager
def streaming_safetensors():
    """Read checkpoint shards with pread instead of keeping every shard memory-mapped.

    transformers 5 maps all shards at once and keeps them mapped until the
    whole model is loaded, so every page it touched stays in the process's
    RSS: loading a 12 GB checkpoint peaks above 12 GB on top of the model,
    even when the model is quantized to 3 GB as it loads. safetensors' pread
    backend reads each tensor into memory that is freed once it is converted,
    so the peak is the model plus one tensor. (transformers itself uses pread
    on Windows and MPS.)
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:  # a transformers without this code path: nothing to do
        yield
        return

    def pread_open(*args, **kwargs):
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def load_model(source: ModelSource, *, trust_remote_code: bool, dtype=None,
               quantization_config=None, device_map=None):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar and log lines say what happens
    check_remote_code(source, trust_remote_code)
    auto_map = source.config.get("auto_map", {})
    # Some remote-code repos register only AutoModel; their class is still a causal LM.
    loader = AutoModel if auto_map and "AutoModelForCausalLM" not in auto_map else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        if source.chatglm is not None:
            from glmtune.model import chatglm as chatglm_native

            model = chatglm_native.load_model(source.path, source.chatglm, **kwargs)
        else:
            with streaming_safetensors():
                model = loader.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                               **kwargs)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise _weights_error(source, exc) from exc
    except SafetensorError as exc:
        raise GlmtuneError(f"{source.path}: a safetensors weight file is corrupted or "
                           f"truncated ({_first_line(exc)}); re-download or re-export it") from exc
    except (OSError, ValueError) as exc:
        raise GlmtuneError(f"{source.path}: could not load model weights ({_first_line(exc)})") from exc
    except RuntimeError as exc:
        if "size mismatch" in str(exc) or "safetensor" in str(exc).lower():
            raise GlmtuneError(f"{source.path}: model weights do not match config.json or are "
                               f"corrupted ({_first_line(exc)})") from exc
        raise
    if quantization_config is not None:
        from glmtune.model import blockwise

        blockwise.install(model)
    return model


def _weights_error(source: ModelSource, exc: BaseException) -> GlmtuneError:
    """A refused or damaged PyTorch weight file, named when there is only one."""
    bins = sorted(Path(source.path).glob("*.bin")) if source.local else []
    file = bins[0] if len(bins) == 1 else source.path
    return GlmtuneError(f"{file}: {describe_load_failure(exc)} (expected model weights: "
                        "safetensors, or PyTorch .bin files holding tensors only)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
