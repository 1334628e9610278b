"""The native ChatGLM-6B model computes what THUDM's published code computes.

Golden values (v1_golden.json): THUDM's modeling_chatglm.py under transformers 4.33.3
on the tiny checkpoint of tests/fixtures/chatglm_layout.py, in float32 (.float()) and
float16 (.half()); how they were made is in make_v1_golden.py beside this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.data.sample import Message
from glmtune.data.templates import encode_prompt
from glmtune.errors import GlmtuneError
from glmtune.model.chatglm.v1_model import (
    ChatGLM1ForCausalLM,
    glm_position_ids,
    load_v1,
)
from glmtune.model.chatglm.v1_tokenizer import ChatGLM1Tokenizer
from glmtune.model.family import CHATGLM_TARGETS
from tests.fixtures.chatglm_layout import build_chatglm

GOLDEN = json.loads((Path(__file__).with_name("v1_golden.json")).read_text("utf-8"))
PICK = GOLDEN["pick"]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> Path:
    return build_chatglm(tmp_path_factory.mktemp("chatglm1") / "chatglm-6b", 1)


@pytest.fixture(scope="module")
def model(v1_dir) -> ChatGLM1ForCausalLM:
    return load_v1(v1_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(v1_dir) -> ChatGLM1Tokenizer:
    return ChatGLM1Tokenizer.from_dir(v1_dir)


def in_fresh_process(check, *args):
    """Run ``check(*args)`` in a new interpreter; its AssertionError is raised here."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(check, args)


def last_logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=mask).logits[:, -1].float()


def chat_ids(tok, case) -> list[int]:
    messages = []
    for question, answer in case["history"]:
        messages += [Message("user", question), Message("assistant", answer)]
    return encode_prompt("chatglm1", messages + [Message("user", case["query"])], tok)


def test_parameters_carry_the_published_tensor_names(model, v1_dir):
    index = json.loads((v1_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert set(model.state_dict()) == {k for k in index if not k.endswith("rotary_emb.inv_freq")}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_last_token_logits_equal_thudms(model):
    single = GOLDEN["logits_single"]
    logits = last_logits(model, single["input_ids"])[0]
    torch.testing.assert_close(logits[PICK], torch.tensor(single["values"]), rtol=1e-5, atol=1e-5)
    assert torch.topk(logits, 5).indices.tolist() == single["top5"]


def test_left_padded_batch_positions_and_logits_equal_thudms(model, tok):
    batch = GOLDEN["logits_batch"]
    ids = torch.tensor(batch["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    # THUDM's tokenizer pads positions with 0; the model only reads real tokens' positions.
    assert (glm_position_ids(ids, mask, model.config) == torch.tensor(batch["position_ids"])).all()
    logits = last_logits(model, batch["input_ids"], mask)
    torch.testing.assert_close(logits[:, PICK], torch.tensor(batch["values"]), rtol=1e-5, atol=1e-5)


def test_training_loss_equals_thudms(model):
    train = GOLDEN["train"]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([train["input_ids"]]),
                     labels=torch.tensor([train["labels"]])).loss
    assert loss.item() == pytest.approx(train["loss"], rel=1e-5)


def test_right_padding_changes_nothing(model, tok):
    """glmtune's collate pads on the right; the real tokens' logits stay the same."""
    ids = GOLDEN["train"]["input_ids"]
    alone = model(input_ids=torch.tensor([ids])).logits
    padded = torch.tensor([ids + [tok.pad_token_id] * 5])
    mask = torch.tensor([[1] * len(ids) + [0] * 5])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[:, :len(ids)],
                                   alone.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", range(len(GOLDEN["chat"])))
def test_greedy_answer_equals_thudms_chat(model, tok, index):
    case = GOLDEN["chat"][index]
    ids = chat_ids(tok, case)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=24, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert new == case["new_ids"]
    assert tok.decode(new).strip() == case["response"]


def test_kv_cache_and_left_padded_batches_generate_the_same(model, tok):
    cases = [c for c in GOLDEN["chat"] if not c["history"]]
    prompts = [chat_ids(tok, c) for c in cases]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        recomputed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24,
                                    do_sample=False, use_cache=False)
    assert cached.tolist() == recomputed.tolist()
    assert [row[width:] for row in cached.tolist()] == [c["new_ids"] for c in cases]


def test_fp16_logits_equal_thudms_half_model(v1_dir):
    """THUDM's rotary tables are computed in fp16 for a half model; so are ours."""
    in_fresh_process(_fp16_logits_equal_thudms, v1_dir)


def _fp16_logits_equal_thudms(v1_dir):
    # one fp16 rounding apart is the whole margin here: computed in a fresh process, so that
    # what earlier tests left in oneDNN's kernel choice cannot move a logit by an ulp
    torch.set_num_threads(1)
    golden = GOLDEN["logits_fp16"]
    model = load_v1(v1_dir, dtype=torch.float16).eval()
    logits = last_logits(model, golden["input_ids"])[0]
    torch.testing.assert_close(logits[PICK], torch.tensor(golden["values"]), rtol=2e-3, atol=2e-3)
    assert torch.topk(logits, 5).indices.tolist() == golden["top5"]


def test_gradient_checkpointing_gives_the_same_gradients(v1_dir):
    train = GOLDEN["train"]
    grads = []
    for checkpointing in (False, True):
        model = load_v1(v1_dir, dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=torch.tensor([train["input_ids"]]),
                     labels=torch.tensor([train["labels"]])).loss
        loss.backward()
        grads.append(model.transformer.layers[0].attention.query_key_value.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_lora_on_the_published_module_names(v1_dir):
    from peft import LoraConfig, get_peft_model

    model = load_v1(v1_dir, dtype=torch.float32)
    ids = torch.tensor([GOLDEN["train"]["input_ids"]])
    base = model(input_ids=ids).logits.detach()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(CHATGLM_TARGETS),
                                                  init_lora_weights=False))
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1]
             for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert names == set(CHATGLM_TARGETS)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_safetensors_shards_and_bf16(tmp_path):
    path = build_chatglm(tmp_path / "safe", 1, safetensors=True)
    assert not list(path.glob("*.bin"))
    single = GOLDEN["logits_single"]
    logits = last_logits(load_v1(path, dtype=torch.float32).eval(), single["input_ids"])[0]
    torch.testing.assert_close(logits[PICK], torch.tensor(single["values"]), rtol=1e-5, atol=1e-5)
    bf16 = load_v1(path, dtype=torch.bfloat16).eval()
    assert bf16.transformer.layers[0].attention.query_key_value.weight.dtype == torch.bfloat16
    logits16 = last_logits(bf16, single["input_ids"])[0]
    assert torch.topk(logits16, 1).indices.item() == single["top5"][0]


def test_4bit_load_quantizes_the_linear_layers(v1_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = load_v1(v1_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    layer = model.transformer.layers[0]
    assert isinstance(layer.attention.query_key_value, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.dense_4h_to_h, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    logits = last_logits(model.eval(), GOLDEN["logits_single"]["input_ids"])[0]
    reference = torch.tensor(GOLDEN["logits_single"]["values"])
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack((logits[PICK], reference)))[0, 1] > 0.5  # nf4 of a tiny random model: same shape, not the same values


@pytest.mark.parametrize("key,value,expected", [
    ("quantization_bit", 4, "--quant 4bit"),
    ("pre_seq_len", 128, "P-Tuning"),
    ("position_encoding_2d", False, "position_encoding_2d"),
])
def test_unsupported_checkpoints_are_refused_with_the_reason(v1_dir, tmp_path, key, value, expected):
    config = json.loads((v1_dir / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlmtuneError, match=expected) as info:
        load_v1(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_detected_and_loaded_natively_from_the_directory(v1_dir):
    """No flag and no remote code: the directory's THUDM files are stand-ins that raise."""
    from glmtune.model import load
    from glmtune.model.family import Family, detect_family

    source = load.resolve(str(v1_dir))
    assert source.chatglm == 1 and not source.needs_remote_code
    tokenizer = load.load_tokenizer(source, trust_remote_code=False)
    assert isinstance(tokenizer, ChatGLM1Tokenizer)
    assert detect_family(source.config, tokenizer, source.path) == Family(
        "chatglm1", "chatglm1", CHATGLM_TARGETS, False)
    assert isinstance(load.load_model(source, trust_remote_code=False), ChatGLM1ForCausalLM)


@pytest.mark.parametrize("index", [i for i, c in enumerate(GOLDEN["chat"]) if not c["history"]])
def test_predict_on_the_bare_base_answers_as_thudms_chat(v1_dir, run_cli, index):
    case = GOLDEN["chat"][index]
    code, out, err = run_cli("predict", "--adapter", "", "--model", v1_dir, "--prompt",
                             case["query"], "--max-new-tokens", 24, "--bf16", "false",
                             "--threads", 1)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == case["response"]


def test_original_layout_adapter_gives_the_tied_head_its_trained_copy(v1_dir):
    """PEFT saves a trained copy of tied embeddings once; the PEFTs that run THUDM's code
    would leave the head on the old matrix, so the exported adapter carries both."""
    from peft import LoraConfig, get_peft_model

    from glmtune.model import chatglm

    model = load_v1(v1_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=2, target_modules=list(CHATGLM_TARGETS), init_lora_weights=False,
        modules_to_save=["word_embeddings", "lm_head"], ensure_weight_tying=True))
    tensors, config = chatglm.adapter_original(peft_model)
    embeddings = tensors["base_model.model.transformer.word_embeddings.weight"]
    assert torch.equal(tensors["base_model.model.lm_head.weight"], embeddings)
    assert "lm_head" in config["modules_to_save"] and "rank_pattern" not in config
    assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight" in tensors


def test_fused_head_and_loss_equal_the_models_loss(v1_dir):
    in_fresh_process(_fused_head_and_loss_equal_the_models_loss, v1_dir)


def _fused_head_and_loss_equal_the_models_loss(v1_dir):
    from peft import LoraConfig, get_peft_model

    from glmtune.model import fused

    model = get_peft_model(load_v1(v1_dir), LoraConfig(r=2, target_modules=list(CHATGLM_TARGETS)))
    ids, labels = torch.tensor([GOLDEN["train"]["input_ids"]]), torch.tensor([GOLDEN["train"]["labels"]])
    expected = model(input_ids=ids, labels=labels).loss
    head, parts = fused.install(model)
    assert head is model.get_base_model().lm_head and "LM head + loss" in parts
    with fused.head_bypassed(head):
        hidden = model(input_ids=ids).logits
    total = fused.linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:])
    assert (total / (labels != -100).sum()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bin_shards_are_mapped_one_at_a_time(v1_dir, monkeypatch):
    """transformers asks for tensors in sorted-name order, and ChatGLM-6B's first shard
    holds word_embeddings (sorted last): were a shard kept until all its tensors were
    taken, every page read so far would stay resident."""
    from glmtune.model.chatglm import weights

    alive: set[int] = set()
    most = []

    class Mapped(dict):
        def __del__(self):
            alive.discard(id(self))

    real = weights.read_shard

    def counting(file):
        mapped = Mapped(real(file))
        alive.add(id(mapped))
        most.append(len(alive))
        return mapped

    monkeypatch.setattr(weights, "read_shard", counting)
    load_v1(v1_dir)
    assert len(most) >= 2 and max(most) == 1
