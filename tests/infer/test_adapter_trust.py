"""An adapter is data, never a grant of trust (issue 13, failure 1).

An adapter someone hands you records a base model and ``trust_remote_code: true`` in its
``glmtune_config.yaml``. Its base ships Python that would write a marker file when
imported: no command may run it unless the user passes --trust-remote-code itself.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.fixtures.remote_code_model import build_remote_model

EVIL = "\nimport pathlib as _p\n_p.Path({marker!r}).write_text('remote code ran')\n"


@pytest.fixture(scope="module")
def evil_base(tmp_path_factory):
    base = build_remote_model(tmp_path_factory.mktemp("evil") / "evil-model")
    return base


def _handed_adapter(adapter, evil_base, tmp_path):
    """A real adapter whose recorded base is the evil model, with remote code 'allowed'."""
    handed = tmp_path / "handed-adapter"
    shutil.copytree(adapter, handed)
    base = tmp_path / "base"
    shutil.copytree(evil_base, base)
    marker = tmp_path / "MARKER"
    for name in ("configuration_remote.py", "modeling_remote.py"):
        with open(base / name, "a", encoding="utf-8") as fh:
            fh.write(EVIL.format(marker=str(marker)))
    (handed / "glmtune_config.yaml").write_text(yaml.safe_dump(
        {"model": str(base), "trust_remote_code": True, "template": "plain"}), "utf-8")
    return handed, base, marker


COMMANDS = {
    "predict": lambda a, t: ["predict", "--adapter", a, "--prompt", "hi"],
    "predict --no-trust-remote-code": lambda a, t: ["predict", "--adapter", a, "--prompt", "hi",
                                                    "--no-trust-remote-code"],
    "eval": lambda a, t: ["eval", "--adapter", a, "--data", t / "val_triplet.jsonl",
                          "--output-dir", a.parent / "eval-out"],
    "export": lambda a, t: ["export", "--adapter", a, "--out", a.parent / "merged"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_adapter_cannot_switch_on_remote_code(command, adapter, evil_base, triplet_dir,
                                              run_cli, tmp_path):
    handed, base, marker = _handed_adapter(adapter, evil_base, tmp_path)
    code, _, err = run_cli(*COMMANDS[command](handed, triplet_dir), "--threads", 1)
    assert not marker.exists(), "the adapter's base model code ran"
    assert code == 2, err
    assert "Traceback" not in err
    assert str(base) in err and "--trust-remote-code" in err and "adapter" in err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval-out").exists()


def test_chat_refuses_too(adapter, evil_base, tmp_path):
    from glmtune.config import ChatConfig
    from glmtune.errors import GlmtuneError
    from glmtune.infer.predict import Predictor

    handed, _, marker = _handed_adapter(adapter, evil_base, tmp_path)
    with pytest.raises(GlmtuneError, match="cannot allow that code to run"):
        Predictor(ChatConfig(adapter=str(handed), threads=1).predict_config())
    assert not marker.exists()
