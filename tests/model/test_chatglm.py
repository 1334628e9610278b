"""THUDM's ChatGLM2-6B / ChatGLM3-6B checkpoints, loaded natively and checked against THUDM's code.

The checkpoints are tiny but in the published layout (tests/fixtures/chatglm_layout.py),
with stand-ins for THUDM's .py files that raise if imported: every test here passing
proves glmtune never runs them. The reference values (token ids, logits, greedy chat()
answers) come from THUDM's own code run once under transformers 4.33.3 — see
chatglm_thudm_reference.json's "_how" and tests/fixtures/chatglm_reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.data.sample import Message
from glmtune.data.templates import encode_prompt, stop_token_ids
from glmtune.errors import GlmtuneError
from glmtune.model import load
from glmtune.model.chatglm import convert, weights
from glmtune.model.chatglm.detect import chatglm_version
from glmtune.model.family import GLM4_TARGETS, Family, detect_family
from tests.fixtures.chatglm_layout import build_chatglm

REFERENCE = json.loads((Path(__file__).parent / "chatglm_thudm_reference.json")
                       .read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    return {v: build_chatglm(root / f"chatglm{v}-6b", v) for v in (2, 3)}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """(tokenizer, family, model) per version, through glmtune's own loading path."""
    out = {}
    for v, path in checkpoints.items():
        source = load.resolve(str(path))
        tokenizer = load.load_tokenizer(source, trust_remote_code=False)
        family = detect_family(source.config, tokenizer, source.path)
        model = load.load_model(source, trust_remote_code=False).eval()
        out[v] = (tokenizer, family, model)
    return out


def _messages(*, history=False, system=False):
    messages = [Message("system", REFERENCE["system"])] if system else []
    if history:
        for question, answer in REFERENCE["history"]:
            messages += [Message("user", question), Message("assistant", answer)]
    return messages + [Message("user", REFERENCE["query"])]


# --- detection ----------------------------------------------------------------

@pytest.mark.parametrize("version", [2, 3])
def test_detected_from_the_directory_without_remote_code(checkpoints, version):
    source = load.resolve(str(checkpoints[version]))
    assert source.chatglm == version and not source.needs_remote_code
    family = detect_family(source.config, None, source.path)
    assert family == Family(f"chatglm{version}", f"chatglm{version}", GLM4_TARGETS, False)


def test_v2_and_v3_told_apart_by_their_tokenizer_code_or_name(checkpoints, tmp_path):
    config = json.loads((checkpoints[3] / "config.json").read_text())
    # identical config keys; v3's tokenizer code lists the role tokens
    assert chatglm_version(checkpoints[3], config) == 3
    bare = tmp_path / "model"
    bare.mkdir()
    assert chatglm_version(bare, {**config, "_name_or_path": ""}) == 2
    assert chatglm_version(bare, config) == 3  # "_name_or_path": "THUDM/chatglm3-6b"
    assert chatglm_version(tmp_path, {"model_type": "chatglm", "position_encoding_2d": True}) == 1
    assert chatglm_version(tmp_path, {"model_type": "glm"}) is None


def test_hub_id_of_a_cached_repo_loads_natively(checkpoints, tmp_path, monkeypatch):
    """A repo fetched once with huggingface-cli sits in the hub cache: found without network."""
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "models--THUDM--chatglm3-6b" / "snapshots" / "0123abc"
    shutil.copytree(checkpoints[3], snapshot)
    (tmp_path / "models--THUDM--chatglm3-6b" / "refs").mkdir()
    (tmp_path / "models--THUDM--chatglm3-6b" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = load.resolve("THUDM/chatglm3-6b")
    assert (source.chatglm, source.local, Path(source.path)) == (3, True, snapshot)
    assert not load.resolve("THUDM/chatglm2-6b").local  # not cached: left to the hub


def test_prequantized_checkpoint_points_to_the_full_one(checkpoints, tmp_path):
    import shutil

    int4 = tmp_path / "chatglm3-6b-int4"
    shutil.copytree(checkpoints[3], int4)
    config = json.loads((int4 / "config.json").read_text())
    (int4 / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(GlmtuneError, match=r"quantization_bit: 4.*full checkpoint.*--quant 4bit"):
        load.resolve(str(int4))


def test_stand_ins_for_thudm_code_refuse_to_run(checkpoints):
    import runpy

    with pytest.raises(RuntimeError, match="must never import"):
        runpy.run_path(str(checkpoints[3] / "modeling_chatglm.py"))


# --- identical to THUDM's code ---------------------------------------------------

@pytest.mark.parametrize("version", [2, 3])
def test_token_ids_equal_thudm(loaded, version):
    tokenizer, family, _ = loaded[version]
    ref = REFERENCE[f"chatglm{version}"]
    for text, ids in ref["encode"].items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        # tokenizer(text) puts [gMASK] sop in front, as THUDM's does
        assert tokenizer(text)["input_ids"][2:] == ids
    assert encode_prompt(family.template, _messages(), tokenizer) == ref["single"]["prompt"]
    assert encode_prompt(family.template, _messages(history=True), tokenizer) == \
        ref["history"]["prompt"]
    if version == 3:
        assert encode_prompt(family.template, _messages(system=True), tokenizer) == \
            ref["system_prompt"]


@pytest.mark.parametrize("version", [2, 3])
def test_logits_and_greedy_answers_equal_thudm(loaded, version):
    tokenizer, family, model = loaded[version]
    ref = REFERENCE[f"chatglm{version}"]
    ids = torch.tensor([ref["single"]["prompt"]])
    with torch.no_grad():
        last = model(input_ids=ids).logits[0, -1]
    assert last[:8].tolist() == pytest.approx(ref["last_logits_first8"], abs=1e-5)
    assert int(last.argmax()) == ref["last_logits_argmax"]
    for case in ("single", "history"):
        ids = torch.tensor([ref[case]["prompt"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=8, eos_token_id=stop_token_ids(family.template,
                                                                           tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
        answer = out[0, ids.shape[1]:].tolist()
        assert answer == ref[case]["greedy_ids"]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == ref[case]["chat"]


@pytest.mark.parametrize("version", [2, 3])
def test_predict_on_the_bare_base_answers_as_thudm_chat(checkpoints, run_cli, version):
    ref = REFERENCE[f"chatglm{version}"]
    code, out, err = run_cli("predict", "--adapter", "", "--model", checkpoints[version],
                             "--bf16", "false", "--prompt", REFERENCE["query"],
                             "--max-new-tokens", 8, "--threads", 1)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == ref["single"]["chat"]


# --- weights on disk ---------------------------------------------------------------

def test_bin_and_safetensors_layouts_load_the_same(loaded, tmp_path):
    safe = build_chatglm(tmp_path / "safe", 3, safetensors=True, shards=3)
    assert not list(safe.glob("*.bin"))
    model = load.load_model(load.resolve(str(safe)), trust_remote_code=False)
    expected = loaded[3][2].state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())


class Payload:
    """Any class: unpickling it could run code, so weights_only loading refuses it."""


def test_bin_shards_are_read_without_unpickling_objects(tmp_path):
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": Payload()}, evil)
    with pytest.raises(GlmtuneError, match="pytorch_model.bin: unreadable weight shard"):
        weights.read_shard(evil)


def test_legacy_bin_format_is_read(tmp_path):
    old = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(3.0)}, old, _use_new_zipfile_serialization=False)
    assert torch.equal(weights.read_shard(old)["w"], torch.arange(3.0))


def test_missing_shard_is_named(checkpoints, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[2], broken)
    (broken / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(GlmtuneError, match="pytorch_model-00002-of-00002.bin.*incomplete"):
        load.load_model(load.resolve(str(broken)), trust_remote_code=False)


def test_back_to_thudm_names_is_exact(loaded, checkpoints):
    model = loaded[2][2]
    original = convert.to_original(model.state_dict())
    stored = dict(weights.iter_tensors(checkpoints[2]))
    assert set(stored) - set(original) == {"transformer.rotary_pos_emb.inv_freq"}
    for name, tensor in original.items():
        assert torch.equal(tensor.to(stored[name].dtype), stored[name]), name


def test_adapter_on_query_key_value_is_the_same_update():
    """LoRA on q/k/v == rank-3r LoRA on query_key_value (A stacked, B block-diagonal)."""
    gen = torch.Generator().manual_seed(0)
    r, hidden, sizes = 2, 8, (8, 4, 4)
    state = {}
    for part, rows in zip(convert.SPLIT, sizes):
        state[f"base_model.model.model.layers.0.{part}.lora_A.weight"] = torch.randn(
            r, hidden, generator=gen)
        state[f"base_model.model.model.layers.0.{part}.lora_B.weight"] = torch.randn(
            rows, r, generator=gen)
    state["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] = torch.ones(r, 8)
    out, rank = convert.adapter_to_original(state, r)
    assert rank == 3 * r
    key = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value"
    fused = out[f"{key}.lora_B.weight"] @ out[f"{key}.lora_A.weight"]
    separate = torch.cat([state[f"base_model.model.model.layers.0.{p}.lora_B.weight"]
                          @ state[f"base_model.model.model.layers.0.{p}.lora_A.weight"]
                          for p in convert.SPLIT])
    assert torch.equal(fused, separate)
    assert "base_model.model.transformer.encoder.layers.0.self_attention.dense.lora_A.weight" in out
    del state["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    with pytest.raises(GlmtuneError, match="all of q_proj, k_proj and v_proj"):
        convert.adapter_to_original(state, r)


# --- 4-bit --------------------------------------------------------------------------

def test_4bit_quantizes_the_converted_tensors(checkpoints):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    source = load.resolve(str(checkpoints[3]))
    model = load.load_model(source, trust_remote_code=False,
                            quantization_config=load.quantization_config("4bit", False),
                            device_map={"": "cpu"})
    attn = model.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, p), bnb.nn.Linear4bit)
               for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.tensor([REFERENCE["chatglm3"]["single"]["prompt"]])
    with torch.no_grad():
        last = model(input_ids=ids).logits[0, -1]
    # nf4 rounds the weights: same prediction, logits near the reference
    assert torch.isfinite(last).all()
    expected = torch.tensor(REFERENCE["chatglm3"]["last_logits_first8"])
    assert (last[:8] - expected).abs().max() < 0.5
