"""Why a run stops early, decided in one place.

Four things can end a run before its last step: Ctrl-C or SIGTERM (``docker
stop``), a request through the API (``FineTuner.request_stop``), the memory
guard, and another process of the same run stopping. Each records a reason
here; after every optimizer step the loop asks ``decide`` once, checkpoints and
returns. A second signal aborts at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from glmtune.errors import GlmtuneError

log = logging.getLogger(__name__)

SIGNALS = ("SIGINT", "SIGTERM")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "memory guard": 3}


class Stopper:
    def __init__(self):
        self.reason: str | None = None
        self.flags = ""  # options that the resumed run should add (e.g. a smaller micro-batch)
        self._previous: dict = {}

    def request(self, reason: str, flags: str = "") -> None:
        """Stop after the current optimizer step (the first reason given is the one kept)."""
        if self.reason is None:
            self.reason, self.flags = reason, flags

    def decide(self, dist) -> str | None:
        """The reason to stop now, agreed by every process (one stopping stops all)."""
        if dist.any(self.reason is not None) and self.reason is None:
            self.reason = "another process"
        return self.reason

    # Ctrl-C / SIGTERM: a context manager, so handlers are installed only while training
    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        import signal

        if self.reason is not None:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)
        log.warning("%s received: saving a checkpoint after this step "
                    "(press Ctrl-C again to abort without saving)", self.reason)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


def check_finite(step: int, loss_sum: float, grad_norm: float | None, out: Path, lr: float) -> None:
    """Stop at the first NaN/inf with an error: every later step and any save would spread it."""
    if math.isfinite(loss_sum) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    from glmtune.train.checkpoint import list_checkpoints

    what = (f"the training loss is {loss_sum}" if not math.isfinite(loss_sum)
            else f"the gradient norm is {grad_norm}")
    saved = list_checkpoints(out)
    kept = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint exists"
    raise GlmtuneError(
        f"step {step}: {what}; training stopped and nothing of this run was saved after it "
        f"({kept}; an adapter already in {out} is untouched). Try a lower --lr (now {lr:g}), "
        "gradient clipping (--max-grad-norm 1.0), --bf16 false, or look for extreme values "
        "in the rows of this step")


def on_memory_guard(cfg, rss: int, guard: int, stopper: Stopper, can_shrink: bool):
    """RSS crossed the guard: the settings to continue with (``--auto-shrink``: half the
    micro-batch, twice the accumulation), or None after asking the run to checkpoint and
    stop, with the smaller settings for the resume."""
    from glmtune.plan import halve_batch
    from glmtune.plan.hardware import GB

    half = halve_batch(cfg)
    if cfg.auto_shrink and cfg.batch_size > 1 and can_shrink:
        log.warning("memory guard: RSS %.2f GB crossed %.2f GB; micro-batch -> %d, accumulation "
                    "-> %d (same effective batch), continuing", rss / GB, guard / GB,
                    half.batch_size, half.grad_accum)
        return half
    stopper.request("memory guard", f"--batch-size {half.batch_size} --grad-accum {half.grad_accum}"
                    + ("" if cfg.gradient_checkpointing else " --gradient-checkpointing"))
    log.warning("memory guard: RSS %.2f GB crossed %.2f GB (%.0f%% of the %.2f GB budget); "
                "saving a checkpoint and stopping before the system runs out of memory",
                rss / GB, guard / GB, 100 * cfg.oom_guard, guard / cfg.oom_guard / GB)
    return None
