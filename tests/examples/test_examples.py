"""Every example script runs, offline, on tiny-glm, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def one_cpu() -> None:
    # glmtune sizes its thread pool from the CPUs it may use. On a busy 2-core machine two
    # OpenMP threads wait on each other for milliseconds per operation; one is far faster.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_example(script: str, *args, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    # cwd is a scratch directory: anything an example writes by default stays in it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          input=stdin, capture_output=True, text=True, encoding="utf-8",
                          cwd=cwd, env=env, timeout=600, preexec_fn=one_cpu)


def test_inference_triplet(adapter, tiny_model, tmp_path):
    proc = run_example("inference_triplet.py", "--adapter", adapter, "--model", tiny_model,
                       "--max_new_tokens", 6, "--text", "北京是中国的首都。", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "text:     北京是中国的首都。" in proc.stdout and "triplets:" in proc.stdout


def test_evaluate_triplet(adapter, tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "eval"
    proc = run_example("evaluate_triplet.py", "--adapter", adapter, "--model", tiny_model,
                       "--data", triplet_dir / "val_triplet.jsonl", "--max_samples", 2,
                       "--max_new_tokens", 6, "--compare_base", "--output_dir", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "precision" in proc.stdout and "base" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    assert metrics["n"] == 2 and set(metrics["scores"]) == {"adapter", "base"}


@pytest.mark.parametrize("answer, code", [("9\n", 2), ("q\n", 0), ("", 0)])
def test_menu_answers_without_running_anything(answer, code, tmp_path):
    proc = run_example("example_train.py", stdin=answer, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "1. train with a configuration written in Python" in proc.stdout
    if code:
        assert "no example '9'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_example_errors_are_one_line(tmp_path):
    proc = run_example("evaluate_triplet.py", "--adapter", tmp_path / "nope", "--data",
                       tmp_path / "missing.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def trained(out: Path) -> bool:
    return (out / "adapter_config.json").is_file()


def test_train_pure_python(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "adapter"
    proc = run_example("train_pure_python.py", "--model", tiny_model, "--data",
                       triplet_dir / "train_triplet.jsonl", "--output_dir", out,
                       "--max_steps", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert trained(out) and "trained 1 steps" in proc.stdout


def test_train_with_config(tiny_model, triplet_dir, tmp_path):
    import yaml

    from glmtune.plan.presets import preset_overrides

    out = tmp_path / "adapter"
    flags = {"epochs": 1.0, "batch_size": 2, "lora_r": 2, "lr": 1e-3}
    proc = run_example("train_with_config.py", "--config", "small", "--epochs", 1,
                       "--batch_size", 2, "--lora_r", 2, "--learning_rate", 1e-3,
                       "--output_dir", out, "--model", tiny_model,
                       "--data", triplet_dir / "train_triplet.jsonl", "--max_steps", 1,
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "preset small: epochs=1.0 batch_size=2 lora_r=2 lr=0.001" in proc.stdout
    assert trained(out)
    saved = yaml.safe_load((out / "glmtune_config.yaml").read_text("utf-8"))
    assert saved["preset"] == "small"
    # the flags win over the preset, which fills in the rest; on a CPU the plan then merges
    # the 4-bit preset's micro-batches (same effective batch: dequantized once per micro-batch)
    preset = {k: v for k, v in preset_overrides("small").items() if k not in flags}
    assert {k: saved[k] for k in flags if k != "batch_size"} == {k: v for k, v in flags.items()
                                                                if k != "batch_size"}
    assert saved["batch_size"] * saved["grad_accum"] == 2 * preset.pop("grad_accum")
    assert {k: saved[k] for k in preset} == preset


@pytest.mark.slow
def test_train_with_config_under_torchrun(tiny_model, triplet_dir, tmp_path):
    """The QLoRA guide's `torchrun --nproc_per_node=2 train_with_config.py`, unchanged."""
    out = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(EXAMPLES / "train_with_config.py"),
                           "--config", "fast", "--output_dir", str(out), "--model", str(tiny_model),
                           "--data", str(triplet_dir / "train_triplet.jsonl"), "--max_steps", "2"],
                          capture_output=True, text=True, encoding="utf-8", cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert trained(out)
    assert "distributed (ddp): 2 processes" in proc.stderr + proc.stdout


@pytest.mark.slow  # the same training run as above, reached through the menu
def test_menu_runs_the_chosen_example(tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "adapter"
    proc = run_example("example_train.py", "--model", tiny_model, "--data",
                       triplet_dir / "train_triplet.jsonl", "--output_dir", out,
                       "--max_steps", 1, stdin="1\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "== train with a configuration written in Python ==" in proc.stdout
    assert trained(out)
