"""The one training job a web UI server runs, as a ``glmtune train`` subprocess.

The job is the same command a user types, writing the same output directory,
so the CLI, ``make monitor`` and the page agree on what happened. The
registry lives in the server, not the browser: a reloaded page asks it which
job is running and re-attaches to its output directory. Stop sends SIGINT,
which the trainer answers by saving a checkpoint (as Ctrl-C does); Resume
starts the command again from the form (which a reload refills with the job's
settings) with ``--resume auto``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.errors import GlmtuneError

LOG_FILE = "train.log"


class JobBusy(GlmtuneError):
    """A second Start while a job runs: one job per server."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"a job is already running (pid {job.pid}, {job.output_dir})")


@dataclass
class Job:
    command: list[str]             # the full command line, launcher included
    output_dir: Path
    budget_gb: float | None = None  # the plan's memory budget, shown against RSS
    settings: dict = field(default_factory=dict)  # the config values the page changed
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    # (wall time, step) when the page first saw each logged step: the ETA's pace
    seen: list[tuple[float, int]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_FILE

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def observe(self, step: int) -> None:
        if not self.seen or step > self.seen[-1][1]:
            self.seen.append((time.time(), step))

    def eta_seconds(self, total: int | None) -> float | None:
        """Remaining steps at the pace seen so far (None until two steps were seen)."""
        if total is None or len(self.seen) < 2:
            return None
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        return max(0.0, (total - s1) * (t1 - t0) / (s1 - s0))


def train_command(flags: list[str]) -> list[str]:
    """``glmtune train FLAGS`` run by this Python (so the same install runs it)."""
    return [sys.executable, "-m", "glmtune", "train", *flags]


def shown(command: list[str]) -> str:
    """The command as a user would type it."""
    import shlex

    if command[1:3] == ["-m", "glmtune"]:
        command = ["glmtune", *command[3:]]
    return shlex.join(command)


class JobRegistry:
    """At most one running job; remembers the last one for the page to show."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Job | None = None

    def start(self, command: list[str], output_dir: str | Path,
              budget_gb: float | None = None, append_log: bool = False,
              settings: dict | None = None) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise JobBusy(self.job)
            job = Job(list(command), Path(output_dir), budget_gb, dict(settings or {}))
            job.output_dir.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(job.log_path, "a" if append_log else "w", encoding="utf-8") as log:
                log.write(f"$ {shown(command)}\n")
                log.flush()
                # its own session: a Ctrl-C meant for the server reaches the job only
                # through shutdown(), which waits for the checkpoint
                job.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
            self.job = job
            return job

    def stop(self) -> bool:
        """Ask the running job to checkpoint and stop; False when none runs."""
        job = self.job
        if job is None or not job.running:
            return False
        job.proc.send_signal(signal.SIGINT)
        return True

    def shutdown(self, timeout: float = 600) -> None:
        """Server exit: stop the job the way Stop does and wait for its checkpoint."""
        if self.stop():
            try:
                self.job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.job.proc.kill()
