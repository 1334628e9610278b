"""What a training run may do to its output directory (checked before anything loads), and
what it reports when it ends."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.train import artifacts, checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_losses: list[tuple[int, float]]
    train_loss: float | None
    seconds: float
    interrupted: str | None = None  # why the run stopped early (stopping.Stopper's reason)
    resume_flags: str = ""          # options the resumed run should add (a smaller micro-batch)


def result(out: Path, state, total_steps: int, seconds: float, train_loss: float | None,
           reason: str | None = None, resume_flags: str = "") -> TrainResult:
    """The run's result, said in the log too: how far the loss came, or why it stopped."""
    losses = [tuple(x) for x in state.eval_losses]
    if reason:
        log.warning("stopped at step %d of %d (%s)", state.step, total_steps, reason)
        return TrainResult(out, state.step, losses, None, seconds, reason, resume_flags)
    if len(losses) > 1:
        log.info("validation loss %.4f -> %.4f (%.0f%% lower)", losses[0][1], losses[-1][1],
                 100 * (1 - losses[-1][1] / losses[0][1]))
    log.info("done in %.1f s; adapter saved to %s", seconds, out)
    return TrainResult(out, state.step, losses, train_loss, seconds)


def check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse anything that would overwrite or orphan earlier work without being asked."""
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"{out}: output_dir exists and is not a directory")
    _check_writable(out)
    if (out / artifacts.ADAPTER_CONFIG).exists() and not cfg.overwrite:
        raise GlmtuneError(f"{out}: already holds a finished adapter; pass --overwrite "
                           "(Make: OVERWRITE=1) to replace it, or choose another --output-dir")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).is_dir():
        raise GlmtuneError(f"{cfg.resume}: resume checkpoint not found (expected 'auto' or a "
                           "checkpoint-N directory)")
    if not cfg.resume and checkpoint.list_checkpoints(out) and not cfg.overwrite:
        raise GlmtuneError(f"{out}: holds checkpoints of an unfinished run; continue it with "
                           "--resume auto (Make: RESUME=auto), or pass --overwrite to start over")


def check_free_space(out: Path, trainable_bytes: int | None) -> None:
    """A checkpoint and the adapter must fit on the disk: the plan knows their size."""
    if trainable_bytes is None:
        return
    # trained parameters take 16 bytes each in memory (weights, grads, two Adam moments); a
    # checkpoint (weights + moments, 12) plus the final adapter (4) take as much on disk
    place = _existing(out)
    free = shutil.disk_usage(place).free
    if free < trainable_bytes:
        raise GlmtuneError(f"{out}: {free / 2**20:.0f} MB free on {place}, but a checkpoint "
                           f"and the adapter need about {trainable_bytes / 2**20:.0f} MB; free "
                           "some space or choose another --output-dir")


def _check_writable(out: Path) -> None:
    """Try a write where the run will write, before minutes of loading rather than after."""
    place = _existing(out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".glmtune-write-test-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GlmtuneError(f"{out}: output_dir cannot be written ({place}: "
                           f"{exc.strerror or exc}); expected a directory you may write to, "
                           "choose another --output-dir") from exc


def _existing(out: Path) -> Path:
    """``out`` or its nearest existing parent: where the run's first write will land."""
    return next((p for p in (out, *out.absolute().parents) if p.exists()), Path("."))
