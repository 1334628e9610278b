"""Live memory monitor and OOM guard.

A background thread samples the process RSS and the system's available
memory every ``interval`` seconds, appends them to ``memory.csv`` and keeps
the peak. When RSS crosses the guard threshold the ``tripped`` flag is set;
the training loop checks it after every optimizer step and checkpoints
before the kernel's OOM killer would take the run down without one.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

GB = 1024 ** 3
CSV_HEADER = ("time_s", "rss_gb", "system_available_gb")


def sample_rss() -> int:
    """This process's resident memory in bytes (tests replace it to fake an OOM)."""
    import psutil

    return psutil.Process().memory_info().rss


def sample_available() -> int:
    from glmtune.hardware import memory

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
