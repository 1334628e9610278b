"""The plan's time prediction: how it scales with the run, and that train says it.

The rates are measured on whatever machine runs the tests, so the structural tests pin them
to fixed values (timing is not deterministic); the formula around them is what they check.
How close the prediction comes to measured steps is in bench/README.md (`make bench`,
`make bench-memory`), not here: no timed asserts.
"""

from __future__ import annotations

import pytest

from glmtune.plan import estimate as est
from glmtune.plan import speed
from tests.plan.test_planner import CHATGLM3

SHAPE = est.shape_from_config(CHATGLM3)


@pytest.fixture
def fixed_rates(monkeypatch):
    monkeypatch.setattr(speed, "matmul_rate", lambda tokens, k, n, dtype, device="cpu": 100e9)
    monkeypatch.setattr(speed, "dequant_rate", lambda quant, dtype: 0.5e9)
    monkeypatch.setattr(speed, "add_seconds_per_element", lambda dtype: 0.1e-9)


def step(**settings):
    tokens, seq, micro = settings.pop("tokens", 128), settings.pop("seq", 128), settings.pop("micro", 1)
    return speed.step_time(SHAPE, est.Settings(**settings), tokens=tokens, seq_len=seq,
                           micro_batches=micro)


def test_matmul_time_is_the_frozen_base_flops_at_the_rate(fixed_rates):
    # forward + input gradient of every block weight and the head: 4·N·T at 100 GFLOP/s,
    # plus attention scores and LoRA, a few percent at 128 tokens
    linear = SHAPE.linear_params + SHAPE.vocab * SHAPE.hidden
    assert step().matmul == pytest.approx(4 * linear * 128 / 100e9, rel=0.05)


def test_checkpointing_recomputes_the_forward_of_the_blocks(fixed_rates):
    ratio = step(gradient_checkpointing=True).matmul / step().matmul
    assert 1.4 < ratio < 1.5  # the blocks' 2 passes become 3; the head's stay 2


def test_a_quantized_base_pays_one_dequantization_per_pass_and_micro_batch(fixed_rates):
    one = step(quant="4bit", gradient_checkpointing=True)
    assert step().dequant == 0
    assert one.dequant == pytest.approx(3 * SHAPE.linear_params / 0.5e9)
    # the same tokens in one micro-batch or eight: eight times the dequantization
    eight = step(quant="4bit", gradient_checkpointing=True, tokens=16, micro=8)
    assert eight.dequant == pytest.approx(8 * one.dequant)
    assert eight.tokens == one.tokens


def test_time_grows_with_tokens_and_the_summary_says_the_total(fixed_rates):
    short, long = step(tokens=128), step(tokens=1024)
    assert 7 < long.seconds / short.seconds <= 8  # fixed costs do not grow
    assert "s/step" in short.describe() and "100 steps ≈" in short.describe(100)
    assert speed.format_duration(3900) == "1 h 05 min"
    assert speed.format_duration(95) == "1 min 35 s"


def test_train_logs_the_predicted_time_for_its_real_batches(tiny_model, triplet_dir, tmp_path, caplog):
    import logging

    from glmtune.config import TrainConfig
    from glmtune.train.recipe import FineTuner

    caplog.set_level(logging.INFO, logger="glmtune")
    FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                          output_dir=str(tmp_path / "o"), max_steps=3, batch_size=2, val_data="",
                          max_samples=8)).train()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("predicted time"))
    assert "s/step" in line and "3 steps ≈" in line
