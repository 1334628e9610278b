"""Damaged checkpoints and failed saves (issue 13, failures 5 and 8).

Every damaged file gets "file: what is wrong", exit 2; ``--resume auto`` falls back to
the newest checkpoint that loads and says which it skipped and why; a full disk during a
save is reported as such. Malicious pickles are built here and would touch a marker file.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil

import pytest

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.train import checkpoint
from glmtune.train.recipe import FineTuner


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _config(tiny_model, triplet_dir, out, **over):
    return TrainConfig(**{**dict(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                                 output_dir=str(out), max_steps=3, batch_size=4, save_steps=1,
                                 logging_steps=1, save_total_limit=None, threads=1), **over})


@pytest.fixture(scope="module")
def checkpoints(tiny_model, triplet_dir, tmp_path_factory):
    """checkpoint-1 and checkpoint-2 of a real run (stopped after step 2)."""
    out = tmp_path_factory.mktemp("run") / "out"
    stop = lambda step, tuner: step == 2 and tuner.request_stop()
    FineTuner(_config(tiny_model, triplet_dir, out), callbacks=[stop]).train()
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [1, 2]
    return out


def _copy(checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(checkpoints, out)
    return out


DAMAGE = {  # name -> (file in checkpoint-2, how to damage it, words of the message)
    "malicious optimizer.pt": ("optimizer.pt", lambda f, m: f.write_bytes(pickle.dumps(_Evil(m))),
                               "refused: the pickle holds Python objects"),
    "0-byte optimizer.pt": ("optimizer.pt", lambda f, m: f.write_bytes(b""), "empty or cut short"),
    "truncated optimizer.pt": ("optimizer.pt",
                               lambda f, m: f.write_bytes(f.read_bytes()[:200]), "damaged"),
    "truncated adapter weights": ("adapter_model.safetensors",
                                  lambda f, m: f.write_bytes(f.read_bytes()[:100]),
                                  "damaged safetensors file"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_names_the_file(case, checkpoints, tiny_model, triplet_dir, run_cli,
                                           tmp_path):
    name, damage, words = DAMAGE[case]
    out, marker = _copy(checkpoints, tmp_path), tmp_path / "PWNED"
    damage(out / "checkpoint-2" / name, marker)
    code, _, err = run_cli("train", "--model", tiny_model, "--data",
                           triplet_dir / "train_triplet.jsonl", "--output-dir", out,
                           "--max-steps", 3, "--batch-size", 4, "--save-steps", 1,
                           "--save-total-limit", "none", "--threads", 1,
                           "--resume", out / "checkpoint-2")
    assert code == 2, err
    assert f"checkpoint-2/{name}:" in err and words in err and "Traceback" not in err
    assert not marker.exists()


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_loads(checkpoints, tiny_model,
                                                                    triplet_dir, caplog, tmp_path):
    out = _copy(checkpoints, tmp_path)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    result = FineTuner(_config(tiny_model, triplet_dir, out, resume="auto")).train()
    assert result.interrupted is None and result.steps == 3
    assert "skipping" in caplog.text and "checkpoint-2/optimizer.pt" in caplog.text
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in caplog.text


def test_resume_auto_with_every_checkpoint_damaged_lists_them(checkpoints, tiny_model,
                                                              triplet_dir, tmp_path):
    out = _copy(checkpoints, tmp_path)
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(GlmtuneError, match="every checkpoint is damaged") as caught:
        FineTuner(_config(tiny_model, triplet_dir, out, resume="auto")).train()
    assert "checkpoint-1/optimizer.pt" in str(caught.value)
    assert "checkpoint-2/optimizer.pt" in str(caught.value)


def test_a_full_disk_during_a_checkpoint_is_reported_as_such(checkpoints, tiny_model,
                                                              triplet_dir, monkeypatch, tmp_path):
    """ENOSPC is mocked (torch.save raises it): no real disk can be filled safely here."""
    import torch

    out = _copy(checkpoints, tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(GlmtuneError, match="no space left on device while saving") as caught:
        FineTuner(_config(tiny_model, triplet_dir, out, resume="auto", max_steps=4)).train()
    assert "checkpoint-3" in str(caught.value) and "resume" in str(caught.value)
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [1, 2]
    assert not list(out.glob(".checkpoint-*"))  # the half-written one is gone


def test_unwritable_output_dir_is_refused_before_loading(tiny_model, triplet_dir, run_cli,
                                                          tmp_path):
    if os.geteuid() == 0:  # root writes through any mode bits; /sys is read-only for root too
        out = "/sys/glmtune-test-output"
    else:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "out"
    code, _, err = run_cli("train", "--model", tiny_model, "--data",
                           triplet_dir / "train_triplet.jsonl", "--output-dir", out)
    assert code == 2, err
    assert "cannot be written" in err and "Traceback" not in err


def test_too_little_free_space_is_refused_before_loading(tiny_model, triplet_dir, monkeypatch,
                                                         run_cli, tmp_path):
    """A nearly full disk is mocked (shutil.disk_usage reports 1 KB free): none can be made here."""
    import collections

    from glmtune.model import load

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1024, 1024))
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli("train", "--model", tiny_model, "--data",
                           triplet_dir / "train_triplet.jsonl", "--output-dir", tmp_path / "out",
                           "--threads", 1)
    assert code == 2, err
    assert "0 MB free" in err and "a checkpoint and the adapter need about" in err
