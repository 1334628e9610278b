"""`glmtune export`: the merged model computes what base + adapter computes, and loads alone."""

from __future__ import annotations

import json

import pytest

from glmtune.config import PredictConfig
from glmtune.infer.predict import Predictor
from tests.conftest import snapshot
from tests.fixtures.random_adapter import build_random_adapter

PROBE = "请从以下文本中抽取三元组:\n北京是中国的首都。"


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return build_random_adapter(tiny_model, tmp_path_factory.mktemp("export-adapter") / "lora",
                                seed=2)


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def test_export_merges_and_verifies(adapter, tiny_model, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, err = run_cli("export", "--adapter", adapter, "--model", tiny_model,
                                "--out", out, "--threads", 1)
    assert code == 0, err
    assert "verified" in stdout and "merged logits equal base + adapter" in stdout
    names = {p.name for p in out.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in (p.name for p in tmp_path.iterdir()))  # no leftovers
    info = json.loads((out / "glmtune_export.json").read_text())
    assert info["verified_max_abs_logit_diff"] <= 1e-4

    # Loaded on its own, without peft, the merged model gives base + adapter's logits.
    with_adapter = Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model),
                                           bf16="false", threads=1))
    ids = with_adapter.prompt_ids(PROBE)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = logits(with_adapter.model, ids)
    assert (logits(merged, ids) - expected).abs().max().item() <= 1e-4
    # the adapter really changes the model, so the equality above means something
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert (logits(base, ids) - expected).abs().max().item() > 1e-2
    assert AutoTokenizer.from_pretrained(out).encode(PROBE) == with_adapter.tokenizer.encode(PROBE)


def test_export_refuses_a_non_empty_out_unless_overwrite(adapter, tiny_model, run_cli, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("someone's work")
    before = snapshot(out)
    code, _, err = run_cli("export", "--adapter", adapter, "--model", tiny_model, "--out", out)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert snapshot(out) == before

    code, _, err = run_cli("export", "--adapter", adapter, "--model", tiny_model, "--out", out,
                           "--overwrite", "--dtype", "bfloat16", "--threads", 1)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "glmtune_export.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # old copy and staging removed


def test_export_needs_an_adapter(run_cli, tmp_path):
    code, _, err = run_cli("export", "--adapter", tmp_path / "missing", "--out", tmp_path / "m")
    assert code == 2 and "missing" in err and "not found" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("auto_model_only", [False, True])
def test_export_remote_code_model(auto_model_only, run_cli, tmp_path):
    from glmtune.model import load
    from tests.fixtures.remote_code_model import build_remote_model

    base = build_remote_model(tmp_path / "remote-glm", auto_model_only=auto_model_only)
    adapter = build_random_adapter(base, tmp_path / "lora", trust_remote_code=True)
    out = tmp_path / "merged"
    code, stdout, err = run_cli("export", "--adapter", adapter, "--model", base,
                                "--trust-remote-code", "--out", out, "--threads", 1)
    assert code == 0, err
    assert "verified" in stdout
    # the model's own code travels with it, or the export would not load anywhere else
    assert (out / "modeling_remote.py").is_file() and (out / "configuration_remote.py").is_file()

    with_adapter = Predictor(PredictConfig(adapter=str(adapter), model=str(base),
                                           trust_remote_code=True, bf16="false", threads=1))
    ids = with_adapter.prompt_ids(PROBE)
    merged = load.load_model(load.resolve(str(out)), trust_remote_code=True).eval()
    assert (logits(merged, ids) - logits(with_adapter.model, ids)).abs().max().item() <= 1e-4
