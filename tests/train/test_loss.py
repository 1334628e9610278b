"""A micro-batch's loss: packed rows train exactly as each row alone, on both paths."""

from __future__ import annotations

import pytest
import torch

from glmtune.data.dataset import IGNORE_INDEX, Encoded, collate, collate_packed
from glmtune.model import fused
from glmtune.model.family import PACKED_ROWS_MODEL_TYPES
from glmtune.train.loss import summed_loss
from tests.model.test_fused import _glm, _lora


def _rows():
    torch.manual_seed(3)
    rows = []
    for length, prompt in ((9, 4), (14, 6), (5, 2), (11, 3)):
        ids = torch.randint(1, 300, (length,)).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def _loss_and_grads(model, batch, head):
    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, head)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fast", [False, True])
def test_packed_rows_get_the_loss_and_gradients_of_each_row_alone(fast):
    model = _lora(_glm())
    head = fused.install(model)[0] if fast else None
    rows = _rows()
    alone = [_loss_and_grads(model, collate([row], pad_id=0), head) for row in rows]
    # two sequences: three rows packed together, one alone, padded to a multiple of 8
    packed = collate_packed([rows[:3], rows[3:]], pad_id=0)
    assert packed["input_ids"].shape == (2, 32) and int(packed["attention_mask"].sum()) == 39
    loss, grads = _loss_and_grads(model, packed, head)
    assert loss.item() == pytest.approx(sum(l.item() for l, _ in alone), rel=1e-5)
    for name, grad in grads.items():
        expected = sum(g[name] for _, g in alone)
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6), name


def test_without_position_ids_packed_rows_would_see_each_other():
    """The guard on the test above: the same tokens as one long row give another loss."""
    model = _lora(_glm())
    rows = _rows()
    packed = collate_packed([rows[:3]], pad_id=0)
    joined = {"input_ids": packed["input_ids"], "labels": packed["labels"],
              "attention_mask": packed["attention_mask"]}
    with torch.no_grad():
        assert summed_loss(model, joined).item() != pytest.approx(
            summed_loss(model, packed).item(), rel=1e-3)


def _tiny(model_type: str):
    """A 2-layer random ``model_type`` model from transformers, LoRA on every Linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, Qwen2Config

    from tests.fixtures import tiny_moe

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0)
    if model_type == "glm":
        model = _glm()
    elif model_type in tiny_moe.KINDS:
        from transformers import AutoModelForCausalLM

        config = tiny_moe.config_for(model_type, 300, [0])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        for name, param in model.named_parameters():  # routing that depends on the token
            if name.endswith("mlp.gate.weight"):
                torch.nn.init.normal_(param, std=0.5)
    else:
        from transformers import AutoModelForCausalLM

        config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type](**common)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))
    assert model.config.model_type == model_type
    return model


@pytest.mark.parametrize("model_type", sorted(PACKED_ROWS_MODEL_TYPES))
def test_every_model_type_known_to_keep_packed_rows_apart_does(model_type):
    """--packing trusts exactly these types (and warns for others): each must train a packed
    row as if it were alone (reference path: what CUDA and unknown layers run)."""
    model = _tiny(model_type)
    rows = _rows()
    alone = [_loss_and_grads(model, collate([row], pad_id=0), None) for row in rows]
    loss, grads = _loss_and_grads(model, collate_packed([rows[:3], rows[3:]], pad_id=0), None)
    assert loss.item() == pytest.approx(sum(l.item() for l, _ in alone), rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sum(g[name] for _, g in alone), rtol=1e-4, atol=1e-6,
                                   msg=name)
