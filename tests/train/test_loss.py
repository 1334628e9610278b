"""A micro-batch's loss: packed rows train exactly as each row alone, on both paths."""

from __future__ import annotations

import pytest
import torch

from glmtune.data.dataset import IGNORE_INDEX, Encoded, collate, collate_packed
from glmtune.model import fused
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
