"""What the benchmark scripts share: a child process per measured run and its own peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Rows longer than any max_seq_len used here: every batch is full length, as the estimate assumes.
TEXT_ROW = "苹果公司是一家美国的科技公司。Fine-tuning on a laptop. " * 40


def peak_rss_gb() -> float:
    """This process's own peak resident memory in GiB (VmHWM).

    Not ``ru_maxrss``: on Linux a child inherits its parent's high-water mark
    (fork maps the parent's pages, and exec keeps that mark), so a parent that
    once held a large model floors every child's figure.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process; returns its ``CHILD {json}`` line."""
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD ")), None)
    if proc.returncode or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"failed": proc.returncode}
    return json.loads(line[len("CHILD "):])


def report(result: dict) -> None:
    """The child's side of ``run_child``."""
    print("CHILD " + json.dumps(result), flush=True)
