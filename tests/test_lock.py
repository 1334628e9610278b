"""One writer per output (issue 13, failures 2 and 3): real concurrent processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError
from glmtune.lock import lock_path, output_lock

REPO = str(Path(__file__).resolve().parents[1])
HOLD = ("import sys, time\nfrom glmtune.lock import output_lock\n"
        "with output_lock(sys.argv[1], 'holder'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """Another real process holding the lock of a path until the test ends."""
    procs = []

    def hold(target):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": REPO})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_held_by_another_process_names_it(holder, tmp_path):
    target = tmp_path / "out"
    proc = holder(target)
    with pytest.raises(GlmtuneError, match=f"pid {proc.pid} on {socket.gethostname()}.*holder"):
        with output_lock(target):
            pass
    proc.kill()
    proc.wait()
    with output_lock(target):  # the kernel released it with the process
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    target = tmp_path / "out"
    lock_path(target).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with output_lock(target, "second"):
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text
    assert not lock_path(target).exists()  # released


def test_lock_of_another_host_is_not_guessed_away(tmp_path):
    target = tmp_path / "out"
    lock_path(target).write_text(json.dumps({"pid": 1, "host": "other-machine"}))
    with pytest.raises(GlmtuneError, match=r"other-machine.*delete .*\.out\.lock"):
        with output_lock(target):
            pass


def test_batch_predict_and_export_take_the_lock(holder, adapter, run_cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", "utf-8")
    answers = tmp_path / "answers.jsonl"
    holder(answers)
    code, _, err = run_cli("predict", "--adapter", adapter, "--file", prompts, "--out", answers)
    assert code == 2 and "in use by another glmtune process" in err and not answers.exists()
    merged = tmp_path / "merged"
    holder(merged)
    code, _, err = run_cli("export", "--adapter", adapter, "--out", merged)
    assert code == 2 and "in use by another glmtune process" in err and not merged.exists()


def _train(tiny_model, triplet_dir, out, *extra):
    return [sys.executable, "-m", "glmtune", "train", "--model", str(tiny_model), "--data",
            str(triplet_dir / "train_triplet.jsonl"), "--output-dir", str(out), "--max-steps",
            "4", "--batch-size", "4", "--save-steps", "2", "--threads", "1", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GLMTUNE_FAULT", "MAKE")) and k != "MFLAGS"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **extra}


@pytest.mark.slow
def test_two_trainings_on_one_output_then_a_crash(tiny_model, triplet_dir, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "paused"
    first = subprocess.Popen(_train(tiny_model, triplet_dir, out),
                             env=_env(GLMTUNE_FAULT="pause:step-end:3",
                                      GLMTUNE_FAULT_MARKER=str(marker)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never reached step 3"
            time.sleep(0.05)
        # memory.csv is excluded: the paused first run's own sampler thread keeps writing it
        files = lambda: {str(p): p.stat().st_mtime_ns for p in out.rglob("*")
                         if p.name != "memory.csv"}
        before = files()
        second = subprocess.run(_train(tiny_model, triplet_dir, out, "--overwrite"), env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert files() == before
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock file stays behind
        first.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == first.pid
    third = subprocess.run(_train(tiny_model, triplet_dir, out, "--resume", "auto"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert "taking over the lock" in third.stderr and "resumed from" in third.stderr
    assert (out / "adapter_config.json").is_file()
