"""The training loss of one micro-batch, on the fast path or the reference path."""

from __future__ import annotations

import contextlib

from glmtune.data.dataset import IGNORE_INDEX, collate
from glmtune.model import fused


def summed_loss(model, batch: dict, head=None):
    """Cross-entropy summed over the trained tokens (fp32), so micro-batches weigh by tokens.

    ``head``: the LM head when the fast path fuses it with the loss; the model
    then returns hidden states, and only trained positions reach the head.
    Run it under the caller's autocast.
    """
    import torch

    labels = batch["labels"][:, 1:]
    # packed rows are told apart by their restarting position ids, and a mask would
    # hide that from transformers (dataset.collate_packed)
    inputs = ({"position_ids": batch["position_ids"]} if "position_ids" in batch
              else {"attention_mask": batch["attention_mask"]})
    with fused.head_bypassed(head) if head is not None else contextlib.nullcontext():
        # no KV cache: training never reads it back, and transformers looks for packed
        # rows only when there is none
        out = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    if head is not None:
        return fused.linear_cross_entropy(out[:, :-1], head.weight, labels, IGNORE_INDEX)
    keep = labels != IGNORE_INDEX  # prompt positions never reach the fp32 copy
    return torch.nn.functional.cross_entropy(out[:, :-1][keep].float(), labels[keep], reduction="sum")


def trained_tokens(batch) -> int:
    """Positions whose next token is trained (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def mean_loss(model, loss_sum, rows, batch_size: int, pad_id: int) -> float:
    """The loss per trained token over ``rows``, with ``model`` in eval mode and no gradients
    (``loss_sum(batch)`` gives one batch's summed loss); ``model`` is left in training mode."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size], pad_id)
            total += loss_sum(batch).item()
            tokens += trained_tokens(batch)
    model.train()
    return total / max(tokens, 1)
