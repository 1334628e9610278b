"""What the Train tab shows of a run, read from its output directory.

``metrics.jsonl`` (loss, validation loss, tokens/s), ``memory.csv`` (RSS) and
the job's log are the files ``glmtune train`` writes anyway; the page only
reads them, so it shows a run started from the CLI the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.train.monitor import read_memory, read_metrics

# "training: 40 rows, 12 optimizer steps (3.00 epochs), ..." from the trainer's log
_TOTAL_STEPS = re.compile(r"training: \d+ rows, (\d+) optimizer steps")
_STOPPED = re.compile(r"stopped (?:early )?at step (\d+)")
TRAIN, VALIDATION = "train", "validation"


@dataclass
class Progress:
    points: list[tuple[int, float, str]] = field(default_factory=list)  # (step, loss, series)
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    rss_gb: float | None = None
    peak_rss_gb: float | None = None
    stopped_at: int | None = None

    def frame(self):
        """The loss points as the DataFrame a Gradio LinePlot takes.

        Each series starts with an empty (NaN) point: the plot fixes its series from
        the first data it gets, and a run logs a validation loss before any training
        loss, so without it the training curve would never be drawn.
        """
        import pandas as pd

        placeholders = [(0, float("nan"), TRAIN), (0, float("nan"), VALIDATION)]
        return pd.DataFrame(placeholders + self.points, columns=["step", "loss", "series"])


def read_log(out: Path, log_file: str, limit: int = 20000) -> str:
    path = out / log_file
    if not path.is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:  # keep the \r
        text = fh.read()
    # carriage returns are progress-bar redraws: keep only the last state of each line
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text[-limit:]


def read_progress(out: Path, log_text: str = "") -> Progress:
    progress = Progress()
    for record in read_metrics(out):
        if "loss" in record:
            progress.points.append((record["step"], record["loss"], TRAIN))
            progress.step, progress.epoch = record["step"], record.get("epoch")
            progress.loss, progress.tokens_per_s = record["loss"], record.get("tokens_per_s")
        elif "eval_loss" in record:
            progress.points.append((record["step"], record["eval_loss"], VALIDATION))
    memory = read_memory(out)
    if memory:
        progress.rss_gb = memory[-1][1]
        progress.peak_rss_gb = max(row[1] for row in memory)
    totals = _TOTAL_STEPS.findall(log_text)
    if totals:
        progress.total_steps = int(totals[-1])
    stopped = _STOPPED.findall(log_text)
    if stopped:
        progress.stopped_at = int(stopped[-1])
    return progress


def last_error(log_text: str) -> str:
    """What a failed command said last: from its final "error: ..." line on (a config
    error lists its problems below that line), else its last line."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if starts:
        return "\n".join(lines[starts[-1]:]).removeprefix("error:").strip()
    return lines[-1] if lines else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)
