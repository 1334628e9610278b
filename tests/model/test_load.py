"""Model loading: remote code only on request, and clear errors for what cannot load."""

from __future__ import annotations

import json

import pytest

from glmtune.errors import GlmtuneError
from glmtune.model import load
from tests.conftest import snapshot
from tests.fixtures.remote_code_model import build_remote_model


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory):
    return build_remote_model(tmp_path_factory.mktemp("remote") / "remote-glm")


def test_remote_code_needs_the_flag_and_never_prompts(remote_model, run_cli, triplet_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("train", "--model", remote_model, "--data",
                           triplet_dir / "train_triplet.jsonl", "--output-dir", out)
    assert code == 2
    assert "--trust-remote-code" in err and "auto_map" in err
    assert snapshot(out) == {}


def test_remote_model_trains_with_the_flag_on_its_own_modules(remote_model, run_cli, triplet_dir,
                                                                tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("train", "--model", remote_model, "--trust-remote-code", "--data",
                           triplet_dir / "train_triplet.jsonl", "--output-dir", out,
                           "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "512")
    assert code == 0, err
    assert "model family: generic, prompt template: plain" in err
    adapter = json.loads((out / "adapter_config.json").read_text())
    # all-linear on the model's own modules (peft leaves the output head out)
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert not adapter["modules_to_save"], "a real base keeps its embeddings frozen"


def test_check_remote_code_runs_before_anything_loads(remote_model):
    source = load.resolve(str(remote_model))
    assert source.needs_remote_code
    with pytest.raises(GlmtuneError, match="--trust-remote-code"):
        load.load_tokenizer(source, trust_remote_code=False)


def test_resolve_rejects_files_and_missing_dirs(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(GlmtuneError, match="is a file"):
        load.resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(GlmtuneError, match="not found"):
        load.resolve(str(tmp_path / "missing"))
    # a two-part name is a hub id; resolving it must not touch the network
    assert not load.resolve("THUDM/chatglm3-6b").local


def test_corrupted_weights_are_a_clear_error(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GlmtuneError, match="broken"):
        load.load_model(load.resolve(str(broken)), trust_remote_code=False)
