"""The README's Python API, called the way a notebook user calls it."""

from __future__ import annotations

import glmtune


def _config(tiny_model, triplet_dir, out):
    return glmtune.TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                               output_dir=str(out), max_steps=1, batch_size=4, max_seq_len=128,
                               eval_steps=1)


def test_one_call_train_works_twice_and_after_the_step_by_step_api(tiny_model, triplet_dir,
                                                                    tmp_path):
    # Importing any glmtune.train.* module rebinds glmtune.train to the package;
    # the one-call API must survive that, before and after FineTuner is touched.
    first = glmtune.train(_config(tiny_model, triplet_dir, tmp_path / "a"))
    second = glmtune.train(_config(tiny_model, triplet_dir, tmp_path / "b"))
    tuner = glmtune.FineTuner(_config(tiny_model, triplet_dir, tmp_path / "c"))
    third = glmtune.train(_config(tiny_model, triplet_dir, tmp_path / "d"))
    assert tuner.config.output_dir.endswith("c")
    assert [r.steps for r in (first, second, third)] == [1, 1, 1]
    for name in "abd":
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
