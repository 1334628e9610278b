"""The fast path computes what the reference path (PEFT layers, full logits) computes."""

from __future__ import annotations

import pytest
import torch

from glmtune.model import fused


def _glm(dtype=torch.float32, tie=False):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    config = GlmConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0)
    return GlmForCausalLM(config).to(dtype)


def _lora(model, dropout=0.0, train_head=False):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
        modules_to_save=["lm_head"] if train_head else None))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
            if "lora_B" in name:  # B starts at zero: make the adapter matter
                torch.nn.init.normal_(param, std=0.05)
    return peft_model


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # one right-padded row
    labels = ids.clone()
    labels[:, :6] = -100  # prompt positions are not trained
    labels[mask == 0] = -100
    return ids, mask, labels


def _loss_and_grads(model, head=None, autocast=False):
    ids, mask, labels = _batch()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if head is None:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            keep = labels[:, 1:] != -100
            loss = torch.nn.functional.cross_entropy(logits[keep].float(), labels[:, 1:][keep],
                                                     reduction="sum")
        else:
            with fused.head_bypassed(head):
                hidden = model(input_ids=ids, attention_mask=mask).logits
            loss = fused.linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:])
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("train_head", [False, True])
def test_fp32_fast_path_equals_reference(train_head):
    model = _lora(_glm(), train_head=train_head)
    ref_loss, ref_grads = _loss_and_grads(model)
    head, parts = fused.install(model)
    assert head is not None and parts == ["12 LoRA layers", "5 RMSNorms", "attention", "LM head + loss"]
    loss, grads = _loss_and_grads(model, head)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # every trained tensor, LoRA A and B and (when trained) the head
        assert _relative(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_bf16_fast_path_within_bf16_tolerance(base_dtype):
    """bf16 autocast (bf16 or fp32 base): the paths round differently; loss within 0.5 %, grads 3 %."""
    model = _lora(_glm(base_dtype))
    ref_loss, ref_grads = _loss_and_grads(model, autocast=True)
    head, _ = fused.install(model)
    loss, grads = _loss_and_grads(model, head, autocast=True)
    assert loss == pytest.approx(ref_loss, rel=5e-3)
    for name in grads:
        assert _relative(grads[name], ref_grads[name]) < 3e-2, name
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_tied_trained_embeddings_get_both_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_glm(tie=True), LoraConfig(
        r=4, task_type="CAUSAL_LM", target_modules=["q_proj"],
        modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True))
    ref_loss, ref_grads = _loss_and_grads(model)
    head, _ = fused.install(model)
    loss, grads = _loss_and_grads(model, head)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in grads:
        assert _relative(grads[name], ref_grads[name]) < 1e-4, name


def test_layers_the_kernels_do_not_cover_keep_the_reference_path():
    """LoRA dropout > 0 and merged adapters run PEFT's own forward: outputs identical."""
    model = _lora(_glm(), dropout=0.3)
    ids, mask, _ = _batch()
    model.eval()  # dropout inactive, but the Dropout module is still there
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    fused.install(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), layer.base_layer(x) + layer.lora_B["default"](
        layer.lora_A["default"](x)) * layer.scaling["default"])
    # RMSNorms are fused here, LoRA layers are not: equal up to float rounding
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    layer.merge()
    assert torch.allclose(layer(x), layer.base_layer(x))


def test_heads_of_other_model_types_are_not_fused():
    model = _lora(_glm())
    model.base_model.model.config.model_type = "chatglm"
    head, parts = fused.install(model)
    assert head is None and "LM head + loss" not in parts


def test_linear_cross_entropy_chunks_and_ignores_masked_positions(monkeypatch):
    monkeypatch.setattr(fused, "CE_CHUNK_TOKENS", 3)  # several chunks, one ragged
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([[1, -100, 3, 4, 10], [-100, -100, 0, 7, 2]])
    loss = fused.linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t())[keep], labels[keep], reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)
    assert torch.all(got[0][~keep] == 0)


def test_rms_norm_matches_the_definition():
    x = torch.randn(4, 7, 64, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(64, dtype=torch.float64) + 0.5
    ours = fused.rms_norm(x, weight, 1e-6)
    reference = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ours, reference)
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gr,) = torch.autograd.grad(reference, x, g)
    torch.testing.assert_close(gx, gr)


def test_padding_does_not_change_a_rows_loss():
    """Rows batched with longer, right-padded rows lose exactly what they lose alone."""
    model = _lora(_glm())
    head, _ = fused.install(model)
    ids, mask, labels = _batch()

    def loss(rows):
        with fused.head_bypassed(head), torch.no_grad():
            hidden = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
            return fused.linear_cross_entropy(hidden[:, :-1], head.weight, labels[rows][:, 1:]).item()

    short = 2  # the padded row: 14 real tokens of 20
    alone = torch.tensor([short])
    with torch.no_grad():
        trimmed = model  # the same row without its padding columns
        with fused.head_bypassed(head):
            hidden = trimmed(input_ids=ids[alone, :14], attention_mask=mask[alone, :14]).logits
        unpadded = fused.linear_cross_entropy(hidden[:, :-1], head.weight, labels[alone, 1:14]).item()
    assert loss([0, 1, 2]) == pytest.approx(loss([0]) + loss([1]) + unpadded, rel=1e-5)


def test_generation_with_a_kv_cache_is_unchanged():
    """The fused attention also serves cached decoding (one query, many keys) and left padding."""
    model = _lora(_glm()).eval()
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched generation pads
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(input_ids=ids, **kwargs)
    fused.install(model)
    assert model.get_base_model().config._attn_implementation == fused.ATTENTION
    assert torch.equal(model.generate(input_ids=ids, **kwargs), before)


def test_a_trainable_base_bias_keeps_its_gradient():
    """The LoRA kernel gives no gradient to the base layer: a layer whose bias trains falls back."""
    model = _lora(_glm())
    fused.install(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 96)
    layer(x).sum().backward()
    assert layer.base_layer.bias.grad is not None
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((layer.base_layer.out_features,), 3.0))
