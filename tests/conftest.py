"""Shared fixtures: real models and data, built small and locally (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.cli import main


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The real embedded tiny-glm, built once per test session."""
    from glmtune.model import tiny_glm

    return tiny_glm.build(tmp_path_factory.mktemp("models") / "tiny-glm")


@pytest.fixture(scope="session")
def glm_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Tiny random glm4 / glm4_moe / glm4_moe_lite checkpoints with tiny-glm's tokenizer
    carrying their real chat templates (tests/fixtures/tiny_moe.py), built once."""
    from tests.fixtures import tiny_moe

    root = tmp_path_factory.mktemp("glm-models")
    return {kind: tiny_moe.build(kind, tiny_model, root / kind) for kind in tiny_moe.KINDS}


@pytest.fixture(scope="session")
def triplet_dir(tmp_path_factory) -> Path:
    from glmtune.data import triplets

    out = tmp_path_factory.mktemp("triplets")
    triplets.write(out, n_train=40, n_val=8, seed=7)
    return out


@pytest.fixture(scope="session")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A saved LoRA adapter on tiny-glm with random (non-zero) weights, built once."""
    from tests.fixtures.random_adapter import build_random_adapter

    return build_random_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def run_cli(capsys):
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, to prove nothing was written."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

