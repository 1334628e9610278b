"""The training loss of one micro-batch, on the fast path or the reference path."""

from __future__ import annotations

import contextlib

from glmtune.data.dataset import IGNORE_INDEX
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
