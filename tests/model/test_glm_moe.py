"""GLM-4-0414 / GLM-Z1 (glm4), GLM-4.5 ... 4.7 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite):
family, prompt format against the real chat templates, LoRA targets, fast path."""

from __future__ import annotations

import logging

import pytest
import torch

from glmtune.data.sample import Message, Sample
from glmtune.data.templates import (
    IGNORE_INDEX,
    encode,
    encode_prompt,
    render_string,
    split_thinking,
    stop_token_ids,
    strip_thinking,
)
from glmtune.errors import GlmtuneError
from glmtune.model import fused, lora
from glmtune.model.family import GLM4_MOE_LITE_TARGETS, GLM4_MOE_TARGETS, MOE_EXPERT_PARAMETERS, detect_family
from tests.fixtures.glm_configs import GLM_45_AIR, GLM_46, GLM_47_FLASH
from tests.model.test_fused import _loss_and_grads, _relative  # the same batch and checks

U, A, S = "user", "assistant", "system"
# Conversations the templates must agree on: one turn, a system prompt and history, reasoning
# in the last answer, reasoning in an earlier answer (which GLM-4.5's template drops).
CONVERSATIONS = {
    "single": (Message(U, "你好"), Message(A, "您好！")),
    "history": (Message(S, "Be brief."), Message(U, "Q1"), Message(A, "A1"), Message(U, "Q2"),
                Message(A, "A2")),
    "thinking": (Message(U, "2+2?"), Message(A, "<think>\nadd them\n</think>\n\n4")),
    "thinking in history": (Message(U, "Q1"), Message(A, "<think>r1</think>A1"), Message(U, "Q2"),
                            Message(A, "<think>r2</think>A2")),
}


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _as_dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


# --- family -----------------------------------------------------------------

@pytest.mark.parametrize("config, name, targets", [
    (GLM_45_AIR, "glm4_moe", GLM4_MOE_TARGETS), (GLM_46, "glm4_moe", GLM4_MOE_TARGETS),
    (GLM_47_FLASH, "glm4_moe_lite", GLM4_MOE_LITE_TARGETS)])
def test_published_configs_are_known_moe_families(config, name, targets):
    family = detect_family(config)
    assert (family.name, family.template, family.remote_code) == (name, "glm45", False)
    assert family.lora_targets == targets and "gate" not in targets  # the router is not a target
    assert family.expert_parameters == MOE_EXPERT_PARAMETERS


def test_config_objects_and_tiny_models_are_detected(glm_models):
    from transformers import AutoConfig

    for kind, path in glm_models.items():
        family = detect_family(AutoConfig.from_pretrained(path))
        assert family.name == kind
        assert family.template == ("glm4" if kind == "glm4" else "glm45")


# --- prompt format against the real templates ---------------------------------

@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kind", ["glm4_moe", "glm4_moe_lite"])
def test_glm45_format_is_the_real_template(glm_models, kind, name):
    """Training text = GLM-4.6's chat template (rendered by transformers) + the trained eos;
    the generation prompt = the template's, exactly."""
    _, tokenizer = _load(glm_models[kind])
    messages = CONVERSATIONS[name]
    real = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False)
    assert render_string("glm45", messages, tokenizer=tokenizer) == real + "<|endoftext|>"
    real_prompt = tokenizer.apply_chat_template(_as_dicts(messages[:-1]), tokenize=False,
                                                add_generation_prompt=True)
    assert render_string("glm45", messages[:-1], add_generation_prompt=True,
                         tokenizer=tokenizer) == real_prompt
    # Token ids too: the segments tokenized apart equal the real text tokenized whole.
    ids, _, _ = encode("glm45", Sample(messages=messages), tokenizer, 512)
    assert ids == tokenizer.encode(real + "<|endoftext|>", add_special_tokens=False)


@pytest.mark.parametrize("name", ["single", "history"])
def test_glm4_format_is_the_real_template(glm_models, name):
    """GLM-Z1-0414's template: equal training text. Its generation prompt also opens the
    ``<think>`` block; ours stops before it (the model opens it itself), so the prompt stays
    a prefix of what an adapter was trained on, with or without reasoning in the data."""
    _, tokenizer = _load(glm_models["glm4"])
    messages = CONVERSATIONS[name]
    real = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False)
    assert render_string("glm4", messages, tokenizer=tokenizer) == real + "<|endoftext|>"
    real_prompt = tokenizer.apply_chat_template(_as_dicts(messages[:-1]), tokenize=False,
                                                add_generation_prompt=True)
    ours = render_string("glm4", messages[:-1], add_generation_prompt=True, tokenizer=tokenizer)
    assert real_prompt == ours + "<think>"


def test_reasoning_in_the_last_answer_is_trained(glm_models):
    _, tokenizer = _load(glm_models["glm4_moe"])
    ids, labels, _ = encode("glm45", Sample(messages=CONVERSATIONS["thinking in history"]),
                            tokenizer, 512)
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    # the second answer with its reasoning, the first answer without (as the template drops it),
    # and the role token that ends the first answer
    assert trained == "\n<think></think>\nA1<|user|>\n<think>r2</think>\nA2<|endoftext|>"
    prompt = encode_prompt("glm45", CONVERSATIONS["thinking in history"][:-1], tokenizer)
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX


def test_stop_tokens_include_the_next_role(glm_models):
    _, tokenizer = _load(glm_models["glm4_moe"])
    names = tokenizer.convert_ids_to_tokens(stop_token_ids("glm45", tokenizer))
    assert names == ["<|endoftext|>", "<|user|>", "<|observation|>"]


def test_thinking_split_and_strip():
    assert split_thinking("<think>\nr\n</think>\n\nanswer") == ("r", "answer")
    assert split_thinking("no reasoning") == ("", "no reasoning")
    assert strip_thinking("\n<think>r</think>\nanswer ") == "answer"
    assert strip_thinking("<think>never closed") == "<think>never closed"
    assert strip_thinking("answer with </think> inside") == "answer with </think> inside"


# --- LoRA targets --------------------------------------------------------------

def _targeted(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("targets", ["auto", "all-linear"])
@pytest.mark.parametrize("kind", ["glm4_moe", "glm4_moe_lite"])
def test_default_targets_skip_router_and_routed_experts(glm_models, kind, targets, caplog):
    """Also PEFT's all-linear: without our guard PEFT 0.21 turned it into router + experts."""
    model, tokenizer = _load(glm_models[kind])
    family = detect_family(model.config, tokenizer)
    with caplog.at_level(logging.INFO, logger="glmtune.model.lora"):
        peft_model = lora.attach_lora(model, family, r=2, alpha=4, dropout=0.0, targets=targets,
                                      train_embeddings=False)
    names = _targeted(peft_model)
    assert not any(".mlp.gate." in n or ".mlp.experts." in n for n in names)  # router, experts
    # dense MLP of layer 0 and the shared expert of layer 1 are adapted
    for part in ("layers.0.mlp.down_proj", "layers.1.mlp.shared_experts.gate_proj",
                 "layers.1.mlp.shared_experts.down_proj", "layers.1.self_attn.o_proj"):
        assert any(part + ".lora_A" in n for n in names), part
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA on"))
    assert "shared_experts.up_proj x1" in line and "o_proj x2" in line and "experts." not in (
        line.replace("shared_experts.", ""))


def test_lora_experts_adds_the_fused_expert_weights(glm_models, tmp_path, caplog):
    from peft import PeftModel

    model, tokenizer = _load(glm_models["glm4_moe"])
    family = detect_family(model.config, tokenizer)
    with caplog.at_level(logging.INFO, logger="glmtune.model.lora"):
        peft_model = lora.attach_lora(model, family, r=2, alpha=4, dropout=0.0, targets="auto",
                                      train_embeddings=False, experts=True)
    names = _targeted(peft_model)
    assert any(".mlp.experts." in n for n in names)
    assert not any(".mlp.gate." in n for n in names)  # the router still untouched
    assert any("experts.gate_up_proj x1, " in r.getMessage() for r in caplog.records)
    # the saved adapter loads back onto the same weights (PEFT's transformers-4 renaming off)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    fresh, _ = _load(glm_models["glm4_moe"])
    with lora.v5_target_names(fresh):
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_lora_experts_on_a_dense_model_is_an_error(glm_models):
    model, tokenizer = _load(glm_models["glm4"])
    with pytest.raises(GlmtuneError, match="no routed experts"):
        lora.attach_lora(model, detect_family(model.config, tokenizer), r=2, alpha=4,
                         dropout=0.0, targets="auto", train_embeddings=False, experts=True)


# --- fast path -------------------------------------------------------------------

@pytest.mark.parametrize("kind, experts, parts", [
    ("glm4", False, ["12 LoRA layers", "9 RMSNorms", "attention", "LM head + loss"]),
    ("glm4_moe", False, ["14 LoRA layers", "5 RMSNorms", "attention", "LM head + loss"]),
    ("glm4_moe", True, ["14 LoRA layers", "5 RMSNorms", "attention", "LM head + loss"]),
    ("glm4_moe_lite", False, ["16 LoRA layers", "9 RMSNorms", "attention", "LM head + loss"]),
])
def test_fast_path_equals_reference(glm_models, kind, experts, parts):
    """Attention, norms, LoRA on Linear layers and head + loss fused; router and routed
    experts (and their LoRA) on the reference path: loss and every gradient equal."""
    model, tokenizer = _load(glm_models[kind])
    peft_model = lora.attach_lora(model, detect_family(model.config, tokenizer), r=4, alpha=8,
                                  dropout=0.0, targets="auto", train_embeddings=False,
                                  experts=experts)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter matter
            torch.nn.init.normal_(param, std=0.05)
    ref_loss, ref_grads = _loss_and_grads(peft_model)
    head, fused_parts = fused.install(peft_model)
    assert fused_parts == parts
    loss, grads = _loss_and_grads(peft_model, head)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert _relative(grads[name], ref_grads[name]) < 1e-4, name


def test_checkpoints_from_before_lora_experts_still_resume():
    from glmtune.train.checkpoint import config_differences

    assert config_differences({"model": "m"}, {"model": "m", "lora_experts": False}) == []
    assert config_differences({"model": "m"}, {"model": "m", "lora_experts": True}) == [
        "lora_experts: checkpoint has False, now True"]
