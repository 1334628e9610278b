"""Resumable checkpoints: written atomically, found safely, resumed exactly.

A checkpoint is ``OUTPUT_DIR/checkpoint-N/`` holding the adapter, the
optimizer and scheduler state, the RNG states and the position in the data.
It is assembled in a temporary sibling and renamed into place in one
``os.rename``, so a directory named ``checkpoint-N`` is always complete: a
crash (even ``kill -9``) mid-save leaves only a ``.checkpoint-N.tmp-*``
directory, which resume ignores and the next save clears away.

Everything is loaded back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError, describe_load_failure, excerpt, writing
from glmtune.train import faults

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Fields that change what the training computes: resuming with other values
# would silently produce a different model than either run describes.
# The micro-batch split may change (the memory guard's advice): only the
# effective batch is part of what is computed.
# The optimizer and scheduler state carry lr, weight decay and warm-up: new
# values would be recorded but not used.
SEMANTIC_FIELDS = ("model", "data", "max_samples", "max_seq_len", "template", "lora_r",
                   "lora_alpha", "lora_dropout", "target_modules", "train_embeddings",
                   "effective_batch", "seed", "quant", "lr", "weight_decay", "warmup_ratio",
                   "group_by_length", "neftune_alpha", "lora_experts")
# Fields newer than some checkpoints: a checkpoint without one ran with its default.
_ADDED_DEFAULTS = {"lora_experts": False}


@dataclass
class TrainerState:
    """What, besides tensors, a run needs to continue exactly where it stopped."""

    step: int = 0
    rows_seen: int = 0              # training rows consumed (= data position)
    window_loss: float = 0.0        # partial logging window, so logged losses match
    window_tokens: int = 0
    window_input_tokens: int = 0
    eval_losses: list[list[float]] = field(default_factory=list)
    best_step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def advance(self, step: int, rows: int, loss_sum: float, tokens: int, input_tokens: int) -> None:
        """Count a finished optimizer step into the data position and the log window."""
        self.step, self.rows_seen = step, self.rows_seen + rows
        self.window_loss += loss_sum
        self.window_tokens += tokens
        self.window_input_tokens += input_tokens

    def record_eval(self, step: int, loss: float) -> None:
        """Keep a validation loss; the best step is the lowest after training began."""
        best = dict(map(tuple, self.eval_losses)).get(self.best_step)
        self.eval_losses.append([step, loss])
        if step and (best is None or loss < best):
            self.best_step = step


def start_fresh(out: Path, dist) -> None:
    """Before a run that does not resume (``--overwrite`` of an earlier one): that run's
    checkpoints must never be resumed into this one."""
    if dist.is_main:
        for _, old in list_checkpoints(out):
            shutil.rmtree(old)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporaries never match the name)."""
    if not out.is_dir():
        return []
    found = []
    for path in out.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


ENGINE_DIR = "engine"  # sharded optimizer state (FSDP / DeepSpeed), one part per rank


def shared_staging(out: Path, step: int) -> Path:
    """The staging directory every rank of a sharded run writes its part into.

    Named like any temporary (so a crash leaves nothing resume would pick); rank 0
    creates it after clearing older temporaries, then ``save(staged=...)`` completes it.
    """
    return out / f".checkpoint-{step}.tmp-shared"


def prepare_shared_staging(out: Path, step: int) -> Path:
    _remove_stale_temporaries(out)
    path = shared_staging(out, step)
    path.mkdir(parents=True)
    return path


def save(out: Path, state: TrainerState, model, optimizer, scheduler, *,
         keep: int | None, protect: set[int] = frozenset(), staged: Path | None = None,
         weights: dict | None = None) -> Path:
    """Write checkpoint-N atomically (rank 0).

    A sharded run passes the shared ``staged`` directory its ranks already wrote
    their optimizer parts into, ``optimizer=None``, and the gathered ``weights``.
    """
    import torch

    from glmtune.atomic import adopted_dir, staging_dir

    target = out / f"checkpoint-{state.step}"
    if staged is None:
        _remove_stale_temporaries(out)
    with writing(target, "the earlier checkpoints are intact"), \
            (adopted_dir(staged) if staged else staging_dir(target)) as staged:
        model.save_pretrained(staged, **({} if weights is None else {"state_dict": weights}))
        tensors = {"scheduler": scheduler.state_dict(), "rng": _rng_state()}
        if optimizer is not None:
            tensors["optimizer"] = optimizer.state_dict()
        torch.save(tensors, staged / TENSORS_FILE)
        faults.point("checkpoint-save", state.step)
        # written last: list_checkpoints() only counts directories that have it
        (staged / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1), "utf-8")
        for child in staged.iterdir():
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():  # an earlier run's checkpoint of the same step (--overwrite)
            shutil.rmtree(target)
        os.rename(staged, target)
    _prune(out, keep, protect | {state.step})
    return target


def _damaged(file: Path, exc: BaseException) -> GlmtuneError:
    what = describe_load_failure(exc) or excerpt(str(exc).strip().splitlines()[0]
                                                 if str(exc).strip() else type(exc).__name__)
    return GlmtuneError(f"{file}: checkpoint is damaged: {what}; resume from an earlier "
                        "checkpoint-N with --resume PATH")


def saved_config(path: Path) -> dict[str, Any]:
    """The config a checkpoint was written with (to compare before anything is loaded)."""
    try:
        return json.loads((path / STATE_FILE).read_text("utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path, exc) from exc


def load(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore a checkpoint into an already-built model / optimizer / scheduler.

    ``optimizer=None`` (a sharded run): the adapter and optimizer come back through
    the engine's own state in ``ENGINE_DIR``; this restores the rest.
    """
    from peft import set_peft_model_state_dict

    # a sharded run's adapter comes back with its engine state instead
    state, tensors, weights = _read(path, weights=optimizer is not None)
    if optimizer is not None:
        set_peft_model_state_dict(model, {k: v.to(next(model.parameters()).device)
                                          for k, v in weights.items()})
        optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    _set_rng_state(tensors["rng"])
    return state


def _read(path: Path, weights: bool = True):
    """(state, tensors, adapter weights) of a checkpoint; a damaged file is named."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / STATE_FILE
    try:
        state = TrainerState(**json.loads(file.read_text("utf-8")))
        file = path / TENSORS_FILE
        tensors = torch.load(file, weights_only=True, map_location="cpu")
        if not isinstance(tensors, dict) or not {"scheduler", "rng"} <= tensors.keys():
            raise ValueError("not the optimizer/scheduler/RNG state glmtune saves")
        file = path / "adapter_model.safetensors"
        return state, tensors, load_file(file) if weights else None
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError,
            pickle.UnpicklingError, EOFError) as exc:
        raise _damaged(file, exc) from exc


def find_resume_point(out: Path, resume: str, weights: bool = True) -> Path | None:
    """``auto``: the newest complete checkpoint in ``out`` that loads (None if there is none).

    Damaged newer ones are skipped with a warning saying why; if every one is damaged,
    nothing is silently restarted: the error lists them all.
    """
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise GlmtuneError(f"{path}: not a complete checkpoint (no {STATE_FILE}); expected "
                               f"a checkpoint-N directory inside an output directory")
        return path
    found = list_checkpoints(out)
    skipped = []
    for _, path in reversed(found):
        try:
            _read(path, weights)
        except GlmtuneError as exc:
            skipped.append(str(exc).split("; resume from")[0])
            log.warning("--resume auto: skipping %s", skipped[-1])
            continue
        if skipped:
            log.warning("--resume auto: resuming from %s, the newest checkpoint that loads "
                        "(skipped %d damaged)", path, len(skipped))
        return path
    if skipped:
        raise GlmtuneError("--resume auto: every checkpoint is damaged:\n  - "
                           + "\n  - ".join(skipped)
                           + "\npass --overwrite to start over, or --resume PATH")
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    def value(config, name):
        if name == "effective_batch":  # micro-batch x accumulation x processes
            return (config.get("batch_size", 0) * config.get("grad_accum", 0)
                    * config.get("world_size", 1))
        return config.get(name, _ADDED_DEFAULTS.get(name))

    return [f"{name}: checkpoint has {value(saved, name)!r}, now {value(current, name)!r}"
            for name in SEMANTIC_FIELDS if value(saved, name) != value(current, name)]


def _prune(out: Path, keep: int | None, protect: set[int]) -> None:
    """Drop the oldest checkpoints beyond ``keep`` — only ever after a newer one is complete."""
    if not keep:
        return
    found = list_checkpoints(out)
    removable = [(step, path) for step, path in found if step not in protect]
    excess = len(found) - keep
    for _, path in removable[:max(0, excess)]:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Half-written checkpoints of a crashed run: never complete, safe to delete."""
    if out.is_dir():
        for path in out.glob(".checkpoint-*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    _, python_state, python_gauss = random.getstate()
    state = {"python": list(python_state), "python_gauss": python_gauss,
             "numpy_keys": torch.from_numpy(np_state[1].astype("int64")),
             "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(out: Path, resume: str | None, record: dict[str, Any], *, override: bool, model,
            optimizer, scheduler, engine) -> TrainerState | None:
    """Continue where ``--resume`` points: weights, optimizer and schedule loaded in place,
    and the run's state returned; None when there is nothing to resume (start afresh).

    ``record``: what this run would write into a checkpoint; a checkpoint whose settings
    differ in ways that change the result is refused unless ``override``.
    """
    found = find_resume_point(out, resume, weights=not engine.sharded) if resume else None
    if found is None:
        if resume:
            log.info("--resume auto: no checkpoint in %s yet, starting from scratch", out)
        return None
    differences = config_differences(saved_config(found), record)
    if differences and not override:
        raise GlmtuneError(f"{found}: cannot resume, these settings differ from the "
                           "checkpoint's (pass --resume-override to resume anyway):\n  - "
                           + "\n  - ".join(differences))
    state = load(found, model, None if engine.sharded else optimizer, scheduler)
    if engine.sharded:
        engine.load_state(found / ENGINE_DIR, model, optimizer)
    state.config = record
    log.info("resumed from %s at step %d", found, state.step)
    return state


def save_run(out: Path, state: TrainerState, model, optimizer, scheduler, *, engine, dist,
             keep: int | None, keep_best: bool = False) -> None:
    """checkpoint-N from every process of a run: a sharded strategy's ranks first write their
    optimizer shards into a shared staging directory, then rank 0 completes and publishes it.
    ``keep_best``: pruning to ``keep`` spares the best validation step's checkpoint."""
    protect = {state.best_step} if keep_best and state.best_step else set()
    saving: dict[str, Any] = dict(keep=keep, protect=protect)
    if engine.sharded:
        weights = engine.gather_trainable(model)
        if dist.is_main:
            prepare_shared_staging(out, state.step)
        dist.barrier()
        staged = shared_staging(out, state.step)
        engine.save_state(staged / ENGINE_DIR, model, optimizer)
        dist.barrier()
        saving.update(staged=staged, weights=weights)
    if dist.is_main:
        path = save(out, state, model, None if engine.sharded else optimizer, scheduler, **saving)
        log.info("checkpoint saved: %s", path)
    dist.barrier()
