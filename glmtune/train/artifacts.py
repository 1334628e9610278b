"""Writing results so that a crash never leaves a half-written one behind.

Everything is written into a temporary sibling first and renamed into place:
``os.replace`` within one file system is atomic, so a reader (or a resume)
sees either the old complete version or the new complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "glmtune_config.yaml"


@contextmanager
def staging_dir(target: Path):
    """A fresh temporary directory beside ``target``; removed if the block fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_files(staged: Path, target: Path, last: str = ADAPTER_CONFIG) -> None:
    """Move every file of ``staged`` into ``target``, the marker file ``last`` at the end.

    Each file is replaced atomically and the adapter config goes last, so a
    directory with an ``adapter_config.json`` always has the weights it names.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staged.iterdir() if p.is_file())
    ordered = [n for n in names if n != last] + ([last] if last in names else [])
    for name in ordered:
        with open(staged / name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged / name, target / name)
    _fsync_dir(target)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged event."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled  # disabled on all but one process
        self.records: list[dict] = []

    def reset(self) -> None:
        self.records = []
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: forget what the interrupted run logged after its checkpoint."""
        records = []
        if self.path.is_file():
            records = [json.loads(line) for line in self.path.read_text("utf-8").splitlines()
                       if line.strip()]
        self.records = [r for r in records if r.get("step", 0) <= step]
        if self.enabled:
            write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def plot_losses(records: list[dict], path: Path) -> None:
    """``loss.png``: training loss per logged step, validation loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
