"""Never lose a run: atomic checkpoints, exact resume, clean stops, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.train import checkpoint
from glmtune.train.faults import InjectedFault
from glmtune.train.recipe import FineTuner


def config(tiny_model, triplet_dir, out, **over) -> TrainConfig:
    base = dict(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                output_dir=str(out), max_steps=6, batch_size=4, grad_accum=2, save_steps=2,
                logging_steps=1, eval_steps=3, save_total_limit=None)
    return TrainConfig(**{**base, **over})


def losses(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]


def assert_same_adapter(a: Path, b: Path) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def stop_at(step):
    return lambda current, tuner: current == step and tuner.request_stop()


@pytest.mark.parametrize("bf16", ["false", "true"])
def test_stop_and_resume_is_bit_exact(bf16, tiny_model, triplet_dir, tmp_path):
    straight = tmp_path / "straight"
    FineTuner(config(tiny_model, triplet_dir, straight, bf16=bf16)).train()

    resumed = tmp_path / "resumed"
    first = FineTuner(config(tiny_model, triplet_dir, resumed, bf16=bf16), callbacks=[stop_at(3)]).train()
    assert first.interrupted == "request" and first.steps == 3
    assert [step for step, _ in checkpoint.list_checkpoints(resumed)] == [2, 3]
    assert not (resumed / "adapter_config.json").exists(), "no final adapter for an unfinished run"

    second = FineTuner(config(tiny_model, triplet_dir, resumed, bf16=bf16, resume="auto")).train()
    assert second.interrupted is None and second.steps == 6
    assert_same_adapter(straight, resumed)
    assert losses(straight) == losses(resumed)


def test_fault_mid_save_leaves_nothing_resume_would_pick(tiny_model, triplet_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("GLMTUNE_FAULT", "raise:checkpoint-save:4")
    with pytest.raises(InjectedFault):
        FineTuner(config(tiny_model, triplet_dir, out)).train()
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]
    assert not list(out.glob(".checkpoint-*")), "the staging directory is cleaned up"
    assert checkpoint.find_resume_point(out, "auto").name == "checkpoint-2"


def test_resume_refuses_changed_training_semantics(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    FineTuner(config(tiny_model, triplet_dir, out), callbacks=[stop_at(2)]).train()
    with pytest.raises(GlmtuneError) as info:
        FineTuner(config(tiny_model, triplet_dir, out, resume="auto", seed=1, batch_size=2,
                         lr=1e-3)).train()
    assert "seed" in str(info.value) and "effective_batch" in str(info.value)
    assert "lr:" in str(info.value)
    assert "--resume-override" in str(info.value)
    result = FineTuner(config(tiny_model, triplet_dir, out, resume="auto", seed=1,
                              resume_override=True)).train()
    assert result.steps == 6


def test_unfinished_run_is_not_clobbered_by_a_fresh_start(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    FineTuner(config(tiny_model, triplet_dir, out), callbacks=[stop_at(2)]).train()
    with pytest.raises(GlmtuneError, match="--resume auto"):
        FineTuner(config(tiny_model, triplet_dir, out)).train()
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]


def test_pruning_keeps_the_newest_and_the_best(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    FineTuner(config(tiny_model, triplet_dir, out, max_steps=9, save_steps=1, save_total_limit=2,
                     save_best=True, eval_steps=1), callbacks=[stop_at(8)]).train()
    kept = [step for step, _ in checkpoint.list_checkpoints(out)]
    evals = [(r[0], r[2]) for r in losses(out) if r[2] is not None and r[0] > 0]
    best = min(evals, key=lambda e: e[1])[0]
    # two in all, as HF's save_total_limit: the newest, and the best (or the one before)
    assert kept == ([7, 8] if best >= 7 else [best, 8])


def test_damaged_checkpoint_is_a_clear_error(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    FineTuner(config(tiny_model, triplet_dir, out), callbacks=[stop_at(2)]).train()
    tensors = out / "checkpoint-2" / checkpoint.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(GlmtuneError, match="checkpoint is damaged"):
        FineTuner(config(tiny_model, triplet_dir, out, resume="auto")).train()


# --- real processes: kill -9 and signals ------------------------------------------------

def _cli(tiny_model, triplet_dir, out, *extra):
    return [sys.executable, "-m", "glmtune", "train", "--model", str(tiny_model), "--data",
            str(triplet_dir / "train_triplet.jsonl"), "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "4", "--grad-accum", "2", "--save-steps", "2", "--logging-steps", "1",
            "--eval-steps", "3", "--save-total-limit", "none", *extra]


def _env(**extra):
    # as a user's shell would run it, also under `make test`
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GLMTUNE_FAULT", "MAKE")) and k != "MFLAGS"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def straight_run(tiny_model, triplet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    subprocess.run(_cli(tiny_model, triplet_dir, out, "--threads", "1"), check=True,
                   env=_env(), capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint-save:4", "step-end:5", "step-end:1"])
def test_kill_9_then_resume_auto_equals_uninterrupted(where, straight_run, tiny_model, triplet_dir,
                                                       tmp_path):
    out, marker = tmp_path / "out", tmp_path / "paused"
    child = subprocess.Popen(_cli(tiny_model, triplet_dir, out, "--threads", "1"),
                             env=_env(GLMTUNE_FAULT=f"pause:{where}", GLMTUNE_FAULT_MARKER=str(marker)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the fault point"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # from the parent, at exactly that point
    child.wait()
    assert not (out / "adapter_config.json").exists()
    expected = {"checkpoint-save:4": [2], "step-end:5": [2, 4], "step-end:1": []}[where]
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == expected

    done = subprocess.run(_cli(tiny_model, triplet_dir, out, "--threads", "1", "--resume", "auto"),
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_adapter(straight_run, out)
    assert losses(straight_run) == losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(sig, code, tiny_model, triplet_dir,
                                                                 tmp_path):
    out = tmp_path / "out"
    argv = _cli(tiny_model, triplet_dir, out, "--max-steps", "2000", "--save-steps", "1000")
    child = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text()):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "--resume auto" in stdout and "Traceback" not in stderr
    steps = [step for step, _ in checkpoint.list_checkpoints(out)]
    assert len(steps) == 1 and steps[0] < 1000
