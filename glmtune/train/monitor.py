"""Live memory monitor and OOM guard.

A background thread samples the process RSS and the system's available
memory every ``interval`` seconds, appends them to ``memory.csv`` and keeps
the peak. When RSS crosses the guard threshold the ``tripped`` flag is set;
the training loop checks it after every optimizer step and checkpoints
before the kernel's OOM killer would take the run down without one.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path

from glmtune.plan.hardware import GB

log = logging.getLogger(__name__)

CSV_HEADER = ("time_s", "rss_gb", "system_available_gb")


def sample_rss() -> int:
    """This process's resident memory in bytes (tests replace it to fake an OOM)."""
    import psutil

    return psutil.Process().memory_info().rss


def sample_available() -> int:
    from glmtune.plan.hardware import memory

    return memory()[1]


class MemoryMonitor:
    def __init__(self, csv_path: Path | None, guard_bytes: int | None, interval: float = 0.5):
        self.csv_path, self.guard_bytes, self.interval = csv_path, guard_bytes, interval
        self.peak_rss = 0
        self.last_rss = 0
        self.tripped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def __enter__(self):
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if not self.csv_path.exists():
                self.csv_path.write_text(",".join(CSV_HEADER) + "\n")
        self.sample()
        self._thread = threading.Thread(target=self._run, name="glmtune-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        self.poll()
        rss = self.last_rss
        if self.csv_path is not None:
            with open(self.csv_path, "a", newline="") as fh:
                csv.writer(fh).writerow([round(time.monotonic() - self._started, 2),
                                         round(rss / GB, 4), round(sample_available() / GB, 4)])
        return rss

    def poll(self) -> bool:
        """Check the guard now (between steps), without waiting for the sampler thread."""
        rss = sample_rss()
        self.last_rss, self.peak_rss = rss, max(self.peak_rss, rss)
        if self.guard_bytes is not None and rss > self.guard_bytes:
            self.tripped = True
        return self.tripped

    def rearm(self) -> None:
        """After the run shrank its batch: watch again from the current level."""
        self.tripped = False


def _written_rows(path: Path, parse, header: bool = False) -> list:
    """``parse`` of each line of a file the run appends to (none before it exists); a
    line ``parse`` refuses (IndexError, ValueError) is one being written right now."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines()[1 if header else 0:]:
        try:
            rows.append(parse(line))
        except (IndexError, ValueError):
            continue
    return rows


def read_memory(out: Path) -> list[tuple[float, float, float]]:
    """``memory.csv`` of a run as (seconds, RSS GB, system available GB) rows."""
    def parse(line):
        row = next(csv.reader([line]))
        return float(row[0]), float(row[1]), float(row[2])

    return _written_rows(out / "memory.csv", parse, header=True)


def read_metrics(out: Path) -> list[dict]:
    """``metrics.jsonl`` of a run (a line still being written is skipped)."""
    import json

    return _written_rows(out / "metrics.jsonl", json.loads)


def status_line(out: Path) -> str | None:
    """One line on a run in ``out``: its latest step and loss, RSS now and at peak."""
    rows = read_memory(out)
    if not rows:
        return None
    rss = [r[1] for r in rows]
    line = f"RSS {rss[-1]:.2f} GB (peak {max(rss):.2f} GB), system available {rows[-1][2]:.2f} GB"
    logged = [r for r in read_metrics(out) if "loss" in r]
    if logged:
        last = logged[-1]
        line = (f"step {last['step']} epoch {last['epoch']} loss {last['loss']:.4f} "
                f"{last['tokens_per_s']:.0f} tok/s | " + line)
    return line


def follow(out: Path, interval: float = 2.0, once: bool = False) -> int:
    """Print a run's progress until its adapter appears (``make monitor``)."""
    started = time.time()
    last = None
    while True:
        line = status_line(out)
        if line and line != last:
            print(line, flush=True)
            last = line
        finished = out / "adapter_config.json"
        if once or (finished.is_file() and finished.stat().st_mtime >= started):
            if not once:
                print(f"finished: adapter in {out}")
            return 0 if line or finished.is_file() else 1
        time.sleep(interval)


def rss_gb() -> float:
    return sample_rss() / GB  # the same unit as memory.csv and the guard


def progress_bar(total: int, done: int = 0):
    from tqdm.auto import tqdm

    # disable=None: no bar when output is not a terminal (CI logs, files); the
    # log lines carry the same numbers there.
    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True,
                leave=True, disable=None)


def log_window(state, metrics, bar, *, lr: float, steps_per_epoch: int, elapsed: float) -> float:
    """Log the steps since the last log line (metrics.jsonl, progress bar, log); their loss."""
    loss = state.window_loss / max(state.window_tokens, 1)
    record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3),
              "loss": round(loss, 5), "lr": lr,
              # every non-padding token the model processed, prompt included
              "tokens": state.window_input_tokens,
              "tokens_per_s": round(state.window_input_tokens / max(elapsed, 1e-9), 1),
              "rss_gb": round(rss_gb(), 3)}
    metrics.write(record)
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    rss=f"{record['rss_gb']:.2f}G")
    log.info("%s", {k: record[k] for k in ("loss", "lr", "epoch")})
    state.window_loss, state.window_tokens, state.window_input_tokens = 0.0, 0, 0
    return loss


def log_start(rows: int, total_steps: int, steps_per_epoch: int, cfg, world: int,
              strategy: str, distributed: bool, predicted=None, steps_left: int = 0) -> None:
    log.info("training: %d rows, %d optimizer steps (%.2f epochs), effective batch %d",
             rows, total_steps, total_steps / steps_per_epoch, cfg.batch_size * world * cfg.grad_accum)
    if predicted is not None:  # plan.speed.StepTime
        log.info("predicted time: %s", predicted.describe(steps_left))
    if distributed or strategy != "ddp":
        log.info("distributed (%s): %d processes x micro-batch %d x accumulation %d",
                 strategy, world, cfg.batch_size, cfg.grad_accum)
