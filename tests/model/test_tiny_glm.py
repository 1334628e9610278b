"""tiny-glm, the embedded default: deterministic, current, and in step with the task it is for."""

from __future__ import annotations

import json

from glmtune.data import triplets
from glmtune.model import tiny_glm


def test_the_stored_task_text_is_what_the_triplet_generator_writes():
    # The tokenizer learns the task's words from a stored copy (the model stage does not
    # import the data stage); a change to the generator must come with a new copy.
    train, val = triplets.generate(n_train=900, n_val=100, seed=tiny_glm.SPEC["seed"])
    expected = [row["prompt"] + "\n" + row["response"] for row in train + val]
    assert list(tiny_glm._training_text()[-len(expected):]) == expected


def test_a_build_is_current_until_its_spec_changes(tiny_model, monkeypatch):
    assert tiny_glm.is_built(tiny_model) and tiny_glm.is_tiny(tiny_model)
    marker = json.loads((tiny_model / tiny_glm.SPEC_FILE).read_text())
    assert marker["fingerprint"] == tiny_glm._fingerprint(tiny_glm._training_text())
    monkeypatch.setitem(tiny_glm.SPEC, "hidden_size", 128)
    assert not tiny_glm.is_built(tiny_model)


def test_builds_are_identical(tiny_model, tmp_path):
    again = tiny_glm.build(tmp_path / "tiny-glm")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
