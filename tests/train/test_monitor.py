"""Live memory monitor and OOM guard.

A real out-of-memory condition cannot be produced safely on a shared CI
machine, so these tests fake the one number the guard reads: the sampled
process RSS (``monitor.sample_rss``). Everything else — the training run,
the checkpoint, the resume — is real.
"""

from __future__ import annotations

import csv
import time

import pytest
import yaml

from glmtune.config import TrainConfig
from glmtune.plan.hardware import GB
from glmtune.train import checkpoint, monitor
from glmtune.train.recipe import FineTuner


def config(tiny_model, triplet_dir, out, **over):
    base = dict(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                output_dir=str(out), max_steps=6, batch_size=4, grad_accum=2, memory_limit=4.0,
                val_data="", logging_steps=1)
    return TrainConfig(**{**base, **over})


def fake_pressure(monkeypatch, from_step: int):
    """RSS above the guard (90% of 4 GB) once training reaches ``from_step``."""
    real, state = monitor.sample_rss, {"on": False}
    monkeypatch.setattr(monitor, "sample_rss", lambda: int(3.8 * GB) if state["on"] else real())
    return lambda step, tuner: state.update(on=step >= from_step)


def test_monitor_sees_an_allocation_in_memory_csv_and_its_peak(tmp_path):
    path = tmp_path / "memory.csv"
    mib = 1024 * 1024
    with monitor.MemoryMonitor(path, guard_bytes=None, interval=0.01) as mon:
        before = monitor.sample_rss()
        block = b"\x01" * (96 * mib)  # written, so every page is resident
        # wait (bounded) for the sampler thread to record the block, then free it
        for _ in range(1000):
            if mon.peak_rss >= before + 90 * mib:
                break
            time.sleep(0.01)
        del block
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == monitor.CSV_HEADER
    assert mon.peak_rss >= before + 90 * mib
    logged = [float(r[1]) * GB for r in rows[1:]]
    # the peak the monitor reports is one it wrote down, and the file shows the block come and go
    assert max(logged) == pytest.approx(mon.peak_rss, rel=0.01)
    assert logged[-1] < max(logged) - 60 * mib


def test_guard_checkpoints_and_stops_then_resumes_smaller(monkeypatch, tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    result = FineTuner(config(tiny_model, triplet_dir, out),
                       callbacks=[fake_pressure(monkeypatch, 3)]).train()
    assert result.interrupted == "memory guard" and result.steps == 3
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]
    assert result.resume_flags.startswith("--batch-size 2 --grad-accum 4")

    monkeypatch.setattr(monitor, "sample_rss", lambda: int(1 * GB))
    done = FineTuner(config(tiny_model, triplet_dir, out, batch_size=2, grad_accum=4,
                            resume="auto")).train()
    assert done.interrupted is None and done.steps == 6
    assert (out / "adapter_config.json").is_file()


def test_auto_shrink_keeps_going_with_the_same_effective_batch(monkeypatch, tiny_model, triplet_dir,
                                                               tmp_path):
    out = tmp_path / "out"
    # One sample above the guard after step 2, whoever takes it (the sampler thread or the
    # check between steps): the smaller batch that follows brings memory back under it.
    real, spike = monitor.sample_rss, {"left": 0}

    def sample():
        if spike["left"]:
            spike["left"] -= 1
            return int(3.8 * GB)
        return real()

    monkeypatch.setattr(monitor, "sample_rss", sample)

    def relieve(step, tuner):
        if step == 2:
            spike["left"] = 1

    result = FineTuner(config(tiny_model, triplet_dir, out, auto_shrink=True),
                       callbacks=[relieve]).train()
    assert result.interrupted is None and result.steps == 6
    saved = yaml.safe_load((out / "glmtune_config.yaml").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)


def test_guard_through_the_cli_exits_3_with_the_resume_command(monkeypatch, run_cli, tiny_model,
                                                               triplet_dir, tmp_path):
    monkeypatch.setattr(monitor, "sample_rss", lambda: int(3.9 * GB))
    code, stdout, err = run_cli("train", "--model", tiny_model, "--data", triplet_dir / "train_triplet.jsonl",
                                "--output-dir", tmp_path / "out", "--memory-limit", "4",
                                "--max-steps", "5", "--batch-size", "4")
    assert code == 3, err
    assert "memory guard" in err and "--resume auto" in stdout and "--batch-size 2" in stdout
