"""Blockwise dequantization of bitsandbytes layers on a CPU, against bitsandbytes' own path.

Every test uses real bitsandbytes layers quantized by bitsandbytes; the reference is the
same layer run through its own class (whole-weight dequantization)."""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from glmtune.model import blockwise, load  # noqa: E402


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1,000 parameters, so every test layer is cut into many."""
    monkeypatch.setattr(blockwise, "BLOCK_PARAMS", 1000)


def _quantized(quant: str, in_features: int, out_features: int, bias: bool = True):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.1
    if quant == "4bit":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                                  quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)._quantize("cpu")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features), requires_grad=False)
    return layer


def _forward_backward(layer, x, grad):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
@pytest.mark.parametrize("in_features, out_features", [(256, 768), (96, 160), (100, 70)])
def test_training_forward_and_input_gradient_match_bitsandbytes(quant, in_features, out_features,
                                                                small_blocks):
    reference = _quantized(quant, in_features, out_features).train()
    layer = copy.deepcopy(reference)
    assert blockwise.install(layer) == 1 and type(layer) is not type(reference)
    x = torch.randn(2, 5, in_features)
    grad = torch.randn(2, 5, out_features)
    y_ref, gx_ref = _forward_backward(reference, x, grad)
    y, gx = _forward_backward(layer, x, grad)
    assert len(blockwise.row_blocks(out_features, in_features, 64)) > 3
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert isinstance(layer, type(reference))  # what PEFT dispatches on


def test_an_eval_mode_8bit_layer_keeps_bitsandbytes_int8_matmul(small_blocks):
    reference = _quantized("8bit", 96, 160).eval()
    layer = copy.deepcopy(reference)
    blockwise.install(layer)
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("rows, cols, align", [(70, 100, 64), (768, 256, 64), (5, 3, 64),
                                               (27392, 4096, 64), (4096, 13696, 64)])
def test_row_blocks_cover_every_row_once_starting_on_a_quantization_block(rows, cols, align):
    blocks = blockwise.row_blocks(rows, cols, align)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(end == start for (_, end), (start, _) in zip(blocks, blocks[1:]))
    assert all(start * cols % align == 0 for start, _ in blocks)
    assert all(end > start for start, end in blocks)
    if rows * cols > 4 * blockwise.BLOCK_PARAMS:
        assert max((end - start) * cols for start, end in blocks) <= 2 * blockwise.BLOCK_PARAMS


def test_a_quantized_tiny_glm_trains_a_lora_step_as_bitsandbytes_does(tiny_model, small_blocks):
    """Loaded the way training loads it: the whole model's loss and LoRA gradients match
    the model with bitsandbytes' own layers restored."""
    from peft import LoraConfig, get_peft_model

    source = load.resolve(str(tiny_model))
    model = load.load_model(source, trust_remote_code=False,
                            quantization_config=load.quantization_config("4bit", compute_bf16=False))
    swapped = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert swapped and all(type(m).__name__ == "BlockwiseLinear4bit" for m in swapped)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False)).train()
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.__class__ = bnb.nn.Linear4bit
    ids = torch.randint(0, 1000, (2, 24))
    results = []
    for m in (model, reference):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
