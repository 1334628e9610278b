"""train -> predict -> chat -> eval -> export on ChatGLM-6B / 2 / 3 in their published layout.

No --trust-remote-code anywhere: the checkpoints carry stand-ins for THUDM's .py files
that raise if imported. The export is written back in THUDM's layout; loaded again
(by glmtune, natively) it answers exactly as base + adapter. That THUDM's own code
under transformers 4.33.3 also answers so was checked in a scratch environment
(tests/fixtures/chatglm_reference.py, "export" mode; ChatGLM-6B:
tests/model/chatglm/make_v1_golden.py, "export" mode).
"""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

from glmtune.config import PredictConfig
from glmtune.infer.chat import run_chat
from glmtune.infer.export import ORIGINAL_ADAPTER
from glmtune.infer.predict import Predictor
from tests.conftest import read_jsonl
from tests.fixtures.chatglm_layout import REMOTE_FILES, build_chatglm

PROMPT = "苹果公司是一家美国的科技公司。"


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2, 3])
def test_whole_pipeline_without_remote_code(version, run_cli, triplet_dir, tmp_path):
    base = build_chatglm(tmp_path / f"chatglm{version}-6b", version)
    lora, merged = tmp_path / "lora", tmp_path / "merged"
    common = ("--bf16", "false", "--threads", 1)

    code, _, err = run_cli("train", "--model", base, "--data", triplet_dir / "train_triplet.jsonl",
                           "--output-dir", lora, "--max-steps", 3, "--batch-size", 2,
                           "--max-seq-len", 256, "--lr", "0.01", *common)
    assert code == 0, err
    assert f"model family: chatglm{version}, prompt template: chatglm{version}" in err
    # the fast path sees a native GLM (v1, an architecture of its own: LoRA, head + loss)
    assert ("attention, LM head + loss" in err) == (version != 1) and "LM head + loss" in err
    adapter_config = json.loads((lora / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"] if version == 1 else
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
    assert not adapter_config["modules_to_save"]

    code, out, err = run_cli("predict", "--adapter", lora, "--prompt", PROMPT,
                             "--max-new-tokens", 8, *common)
    assert code == 0, err
    answer = out.strip().splitlines()[-1]
    code, out, _ = run_cli("predict", "--adapter", "", "--model", base, "--prompt", PROMPT,
                           "--max-new-tokens", 8, *common)
    assert out.strip().splitlines()[-1] != answer  # the adapter changes something

    predictor = Predictor(PredictConfig(adapter=str(lora), max_new_tokens=8, bf16="false",
                                        threads=1))
    stdout = io.StringIO()
    run_chat(predictor, io.StringIO(f"{PROMPT}\n/exit\n"), stdout, io.StringIO(),
             interactive=False)
    assert stdout.getvalue() == f"{answer}\n"

    code, _, err = run_cli("eval", "--task", "triplet", "--adapter", lora, "--data",
                           triplet_dir / "val_triplet.jsonl", "--max-samples", 2,
                           "--max-new-tokens", 4, "--output-dir", tmp_path / "eval", *common)
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "eval" / "predictions.jsonl")) == 2

    code, out, err = run_cli("export", "--adapter", lora, "--out", merged, "--threads", 1)
    assert code == 0, err
    # THUDM's layout: its tensor names, its files copied unchanged
    names = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    base_names = json.loads((base / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert set(names) == set(base_names)
    assert not any(".q_proj." in n or n.startswith("model.") for n in names)
    vocab = "ice_text.model" if version == 1 else "tokenizer.model"
    for file in REMOTE_FILES + (vocab, "tokenizer_config.json"):
        assert (merged / file).read_bytes() == (base / file).read_bytes(), file
    base_config = json.loads((base / "config.json").read_text())
    merged_config = json.loads((merged / "config.json").read_text())
    assert merged_config == base_config  # float16, as THUDM published it (export --dtype auto)
    original = json.loads((merged / ORIGINAL_ADAPTER / "adapter_config.json").read_text())
    assert original["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h",
                                          "query_key_value"]
    # v1 keeps query_key_value as one module: its adapter needs no rank change
    assert original.get("rank_pattern") == (None if version == 1 else
                                            {"query_key_value": 3 * original["r"]})

    code, out, err = run_cli("predict", "--adapter", "", "--model", merged, "--prompt", PROMPT,
                             "--max-new-tokens", 8, *common)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == answer


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed")


@pytest.mark.slow
# One ZeRO-3 run per process: a second one in the same process fails in DeepSpeed
# ("Group ... is not registered"), whatever the model.
@pytest.mark.parametrize("version,strategy", [
    (3, "fsdp"), pytest.param(3, "zero3", marks=needs_deepspeed), (1, "fsdp")])
def test_sharded_strategies_load_the_converted_weights(version, strategy, run_cli, triplet_dir,
                                                       tmp_path):
    """ZeRO-3 loads through transformers' own partitioning path: same weights, same loss."""
    base = build_chatglm(tmp_path / f"chatglm{version}-6b", version)
    losses = []
    for run, extra in (("plain", ()), (strategy, ("--strategy", strategy))):
        code, out, err = run_cli("train", "--model", base, "--data",
                                 triplet_dir / "train_triplet.jsonl", "--output-dir",
                                 tmp_path / run, "--max-steps", 1, "--batch-size", 2,
                                 "--max-seq-len", 128, "--bf16", "false", "--threads", 1, *extra)
        assert code == 0, err
        losses.append(next(line for line in out.splitlines()
                           if line.startswith("validation loss:")).split()[2])
    assert losses[0] == losses[1]
