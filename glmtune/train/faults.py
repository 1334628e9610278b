"""Fault injection for the crash-safety tests; inert unless GLMTUNE_FAULT is set.

``GLMTUNE_FAULT=ACTION:POINT:STEP`` acts when the run reaches ``POINT`` at
optimizer step ``STEP``:

- ``raise``: raise an exception there (an I/O error mid-save, say);
- ``pause``: touch the file named by ``GLMTUNE_FAULT_MARKER`` and sleep, so a
  parent test process can ``kill -9`` the run at exactly that point.

Points: ``checkpoint-save`` (inside a checkpoint write, before it is
complete), ``step-end`` (after an optimizer step, between checkpoints).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class InjectedFault(RuntimeError):
    pass


def point(name: str, step: int) -> None:
    spec = os.environ.get("GLMTUNE_FAULT")
    if not spec:
        return
    action, where, at = spec.split(":")
    if where != name or int(at) != step:
        return
    if action == "raise":
        raise InjectedFault(f"injected fault at {name} step {step}")
    if action == "pause":
        Path(os.environ["GLMTUNE_FAULT_MARKER"]).touch()
        while True:  # until the parent kills us
            time.sleep(1)
    raise ValueError(f"GLMTUNE_FAULT: unknown action {action!r}")
