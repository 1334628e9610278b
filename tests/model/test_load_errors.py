"""One error path for every load (issue 13, failure 5): refused pickles and broken adapter
configs name the file and what is wrong, exit 2, and nothing runs. The malicious pickles
are built here; loading one would touch a marker file."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_base(base, adapter, marker):
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    return ["--adapter", "", "--model", base], "pytorch_model.bin", "refused: the pickle"


def _evil_adapter(base, adapter, marker):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    return ["--adapter", adapter, "--model", base], "adapter_model.bin", "refused: the pickle"


def _adapter_config(change, words="broken adapter config"):
    def broken(base, adapter, marker):
        file = adapter / "adapter_config.json"
        file.write_text(change(json.loads(file.read_text())))
        return ["--adapter", adapter, "--model", base], "adapter_config.json", words
    return broken


CASES = {
    "malicious pytorch_model.bin": _evil_base,
    "malicious adapter_model.bin": _evil_adapter,
    "adapter config is a list": _adapter_config(lambda c: "[1, 2]"),
    "adapter config r: sixteen": _adapter_config(lambda c: json.dumps({**c, "r": "sixteen"})),
    "adapter config unknown peft_type": _adapter_config(
        lambda c: json.dumps({**c, "peft_type": "EVIL"})),
    "adapter config not json": _adapter_config(lambda c: "{oops", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_and_broken_files_are_one_clear_error(case, tiny_model, adapter, run_cli,
                                                      tmp_path):
    base, own, marker = tmp_path / "base", tmp_path / "lora", tmp_path / "PWNED"
    shutil.copytree(tiny_model, base)
    shutil.copytree(adapter, own)
    argv, file, words = CASES[case](base, own, marker)
    code, _, err = run_cli("predict", *argv, "--prompt", "hi", "--threads", 1)
    assert code == 2, err
    assert f"{file}:" in err and words in err and "(expected" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_prompt_file_with_a_lone_surrogate(adapter, run_cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "half \\ud83d"}\n', "utf-8")
    code, _, err = run_cli("predict", "--adapter", adapter, "--file", prompts)
    assert code == 2 and "p.jsonl:2" in err and "lone surrogate" in err


def test_whitespace_only_prompt_is_refused(adapter, run_cli):
    code, _, err = run_cli("predict", "--adapter", adapter, "--prompt", "  \t ")
    assert code == 2 and "prompt: must not be empty or only whitespace" in err
