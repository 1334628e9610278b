"""What a training run leaves in its output directory besides checkpoints: the
metrics log and the loss plot (written through ``glmtune.atomic``)."""

from __future__ import annotations

import json
from pathlib import Path

from glmtune import atomic

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "glmtune_config.yaml"


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
            atomic.write_lines(self.path, (json.dumps(r, ensure_ascii=False) + "\n"
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
    try:
        with atomic.staged_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def save_adapter(out: Path, model, tokenizer, config, weights: dict | None = None) -> None:
    """Adapter + tokenizer + the run's resolved config, staged, then published atomically.

    ``weights``: the trained tensors gathered from a sharded run (None: the model's own).
    ``config`` carries the resolved template, so predict/eval format prompts as training did.
    """
    from glmtune.config import save_yaml
    from glmtune.errors import writing

    with writing(out, "the run's checkpoints are intact and an earlier adapter is kept"), \
            atomic.staging_dir(out) as staged:
        model.save_pretrained(staged, **({} if weights is None else {"state_dict": weights}))
        tokenizer.save_pretrained(staged)
        save_yaml(config, staged / RUN_CONFIG)
        atomic.publish_files(staged, out, last=ADAPTER_CONFIG)
