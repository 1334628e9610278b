"""Non-finite values never train on (issue 13, failure 4)."""

from __future__ import annotations

import shutil

import pytest
import torch

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.train import checkpoint
from glmtune.train.recipe import train
from tests.conftest import snapshot


def poison_at(step):
    """After optimizer step ``step`` one trained weight becomes NaN (a diverging run)."""
    def poison(current, tuner):
        if current == step:
            with torch.no_grad():
                next(p for p in tuner.model.parameters() if p.requires_grad).fill_(float("nan"))
    return poison


def test_training_stops_at_the_first_nan_and_saves_nothing(tiny_model, triplet_dir, adapter,
                                                            tmp_path):
    out = tmp_path / "out"
    shutil.copytree(adapter, out)  # a good adapter from an earlier run, replaced with --overwrite
    good = snapshot(out)
    config = TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                         output_dir=str(out), overwrite=True, max_steps=6, batch_size=4,
                         save_steps=2, logging_steps=1, save_total_limit=None, threads=1)
    with pytest.raises(GlmtuneError) as caught:
        train(config, callbacks=[poison_at(2)])
    message = str(caught.value)
    assert message.startswith("step 3: the training loss is nan")
    assert "checkpoint-2" in message and "--lr" in message
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]
    kept = snapshot(out)
    for name, data in good.items():
        assert kept[name] == data, f"{name} of the earlier adapter was overwritten"


def test_nan_and_inf_settings_are_refused_all_at_once():
    config = TrainConfig(max_grad_norm=float("nan"), weight_decay=float("nan"),
                         neftune_alpha=float("nan"), epochs=float("inf"),
                         memory_limit=float("inf"), lr=float("inf"))
    problems = config.problems()
    for name in ("max_grad_norm", "weight_decay", "neftune_alpha", "epochs", "memory_limit",
                 "lr"):
        assert f"{name}: must be a finite number" in "\n".join(problems), name
