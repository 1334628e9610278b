"""``glmtune export``: merge an adapter into its base and save a standalone model.

The result is an ordinary Hugging Face model directory (safetensors weights,
config, tokenizer) that loads without peft or glmtune. A THUDM ChatGLM(-6B, 2, 3) base is
written back in its own layout (tensor names, config.json, tokenizer and *.py files
of the base), so whatever served the base serves the export, with the adapter
beside it in the same layout (``adapter_original_layout/``). Before anything is
written, the merged model's logits on a probe prompt are compared with the
base + adapter logits in float32: a merge that changed what the model computes
is refused, not saved.

The model is staged in a temporary sibling of ``--out`` and renamed into place
only once complete, so ``--out`` never holds half a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from glmtune import atomic
from glmtune.config import DEMO_PROMPT, EXPORT_DTYPES, ExportConfig, PredictConfig
from glmtune.errors import GlmtuneError
from glmtune.lock import output_lock

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
INFO_FILE = "glmtune_export.json"
# ChatGLM bases: the adapter itself, for base + PEFT serving with THUDM's code.
ORIGINAL_ADAPTER = "adapter_original_layout"


@dataclass
class ExportResult:
    out: Path
    max_abs_diff: float
    probe_tokens: int


def check_overlap(out: Path, inputs: dict[str, str]) -> None:
    """Refuse an output that is, contains or lies inside an input: replacing it deletes that."""
    target = out.resolve()
    for what, given in inputs.items():
        source = Path(given).expanduser()
        if not source.exists():
            continue  # a hub id, not a directory we could destroy
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = ("is" if target == source else
                        "is inside" if source in target.parents else "contains")
            raise GlmtuneError(f"{out}: --out {relation} the {what} {given}; replacing it would "
                               f"delete the {what}. Choose an --out outside it (default: "
                               "<adapter>-merged)")


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"{out}: exists and is not a directory; --out must be a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GlmtuneError(f"{out}: already exists and is not empty; pass --overwrite "
                           "(Make: OVERWRITE=1) to replace it, or choose another --out")


def export(config: ExportConfig) -> ExportResult:
    """Merge, verify, save. Returns where the model went and the largest logit difference."""
    from glmtune.infer.predict import Predictor, adapter_training_config

    config = config.validate()
    if not Path(config.adapter).is_dir():
        raise GlmtuneError(f"{config.adapter}: adapter directory not found; export merges an "
                           "adapter written by `glmtune train` into its base model")
    out = Path(config.resolved_out)
    base = config.model or adapter_training_config(config.adapter).get("model")
    check_overlap(out, {"adapter": config.adapter, **({"base model": base} if base else {})})
    with output_lock(out, "glmtune export"):
        check_target(out, config.overwrite)  # before minutes of loading, not after
        return _merge_and_save(config, out, Predictor(PredictConfig(
            adapter=config.adapter, model=config.model, trust_remote_code=config.trust_remote_code,
            bf16="false", threads=config.threads, out=None)))


def _merge_and_save(config: ExportConfig, out: Path, predictor) -> ExportResult:
    import torch

    model = predictor.model
    original = predictor.source.chatglm is not None  # written back in THUDM's layout
    original_adapter = None
    if original:
        from glmtune.model import chatglm

        try:
            original_adapter = chatglm.adapter_original(model)
        except GlmtuneError as exc:  # the merged model is still worth writing
            log.warning("adapter not written in the original layout: %s", exc)
    # The probe covers the chat template's special tokens as well as text.
    ids = torch.tensor([predictor.prompt_ids(DEMO_PROMPT)], device=predictor.device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        merged.eval()
        got = merged(input_ids=ids).logits.float()
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE:  # also catches NaN
        raise GlmtuneError(
            f"merged model disagrees with base + adapter: max |logit difference| {diff:.3g} "
            f"> {TOLERANCE:g} on a probe prompt; nothing was written. The adapter may use a "
            "layer type peft cannot merge exactly")
    log.info("merged logits match base + adapter: max |difference| %.2e over %d tokens",
             diff, ids.shape[1])

    dtype_name = _saved_dtype(config.dtype, predictor.source.config)
    dtype = getattr(torch, dtype_name)
    merged = merged.to(device="cpu", dtype=dtype)
    info = {"adapter": str(config.adapter), "base_model": predictor.source.name,
            "template": predictor.family.template, "dtype": dtype_name,
            "verified_max_abs_logit_diff": diff, "tolerance": TOLERANCE}
    with atomic.staging_dir(out) as staged:
        if original:
            chatglm.save_original(merged, predictor.source.path, staged, dtype)
            if original_adapter is not None:
                chatglm.write_adapter(staged / ORIGINAL_ADAPTER, *original_adapter)
                info["adapter_original_layout"] = ORIGINAL_ADAPTER
        else:
            merged.save_pretrained(staged)
            predictor.tokenizer.save_pretrained(staged)
        (staged / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        if not any(staged.glob("*.safetensors")):
            raise GlmtuneError(f"{out}: the model was not saved as safetensors; nothing written")
        # an exported model is meant to be shared: not mkdtemp's private permissions
        atomic.replace_dir(staged, out, shared=True)
    return ExportResult(out, diff, ids.shape[1])


def _saved_dtype(requested: str, base_config: dict | None) -> str:
    """``auto``: the dtype the base was published in, so the export is what people already
    serve (ChatGLM-6B/2/3 ship float16); float32 when config.json names none."""
    if requested != "auto":
        return requested
    base_config = base_config or {}
    named = str(base_config.get("torch_dtype") or base_config.get("dtype") or "")
    return named if named in EXPORT_DTYPES and named != "auto" else "float32"
