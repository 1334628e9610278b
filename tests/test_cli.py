"""The command line: bad input is one clear message, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmtune.errors import GlmtuneError
from tests.conftest import snapshot

GOOD_ROW = json.dumps({"prompt": "问", "response": "答"}, ensure_ascii=False)


# name -> (files to write, argv, substrings the message must contain).
# "@name" in argv is a path under the test's tmp dir; good.jsonl always exists.
BAD_INPUTS = {
    "empty file": ({"e.jsonl": b""}, ["--data", "@e.jsonl"], ["e.jsonl", "empty"]),
    "invalid json": ({"j.jsonl": (GOOD_ROW + "\n" + GOOD_ROW + "\n{oops\n").encode()},
                     ["--data", "@j.jsonl"], ["j.jsonl:3"]),
    "missing field": ({"m.jsonl": (GOOD_ROW + '\n{"prompt": "x"}\n').encode()},
                      ["--data", "@m.jsonl"], ["m.jsonl:2", "response"]),
    "wrong type": ({"t.jsonl": (GOOD_ROW + '\n{"prompt": "x", "response": 5}\n').encode()},
                   ["--data", "@t.jsonl"], ["t.jsonl:2", "response", "string"]),
    "unknown extension": ({"d.xls": b"x"}, ["--data", "@d.xls"], ["d.xls", ".jsonl", ".xlsx"]),
    "broken parquet": ({"d.parquet": b"x"}, ["--data", "@d.parquet"], ["d.parquet", "Parquet"]),
    "gbk with --encoding utf-8": ({"g.csv": "prompt,response\n北京,中国\n".encode("gbk")},
                                  ["--data", "@g.csv", "--encoding", "utf-8"],
                                  ["g.csv:2", "--encoding gb18030"]),
    "csv without header": ({"c.csv": "北京,中国\n上海,中国\n".encode()}, ["--data", "@c.csv"],
                           ["c.csv", "header"]),
    "non utf-8": ({"u.jsonl": GOOD_ROW.encode() + b'\n{"prompt": "\xe9"}\n'},
                  ["--data", "@u.jsonl"], ["u.jsonl:2", "UTF-8"]),
    "val in another format": ({"v.jsonl": b'{"text": "hello"}\n'},
                              ["--val-data", "@v.jsonl"], ["v.jsonl", "format"]),
    "missing data file": ({}, ["--data", "@nope.jsonl"], ["nope.jsonl"]),
    "model dir missing": ({}, ["--model", "@no-model"], ["no-model", "not found"]),
    "model dir without config": ({"empty-model/readme.txt": b"x"}, ["--model", "@empty-model"],
                                 ["empty-model", "config.json"]),
    "bad yaml key": ({"c.yaml": b"epochz: 3\nlr: -1\n"}, ["--config", "@c.yaml"],
                     ["epochz", "did you mean 'epochs'"]),
    "bad flag value": ({}, ["--batch-size", "0"], ["batch_size", "positive"]),
    "yaml wrong type": ({"w.yaml": b"batch_size: [1, 2]\n"}, ["--config", "@w.yaml"],
                        ["w.yaml", "batch_size", "expected an integer"]),
    "yaml zero lr": ({"z.yaml": b"lr: 0\nmax_seq_len: -4\n"}, ["--config", "@z.yaml"],
                     ["lr: must be > 0", "max_seq_len: must be a positive integer"]),
    "negative epochs": ({}, ["--epochs", "-1"], ["epochs", "> 0"]),
    "unknown preset": ({}, ["--preset", "huge"], ["preset", "cpu-8gb"]),
    "empty model name": ({}, ["--model", " "], ["model: must not be empty"]),
    "tokenizer missing": ({}, ["--model", "@model-copy"], ["model-copy", "tokenizer"]),
    "corrupted weights": ({}, ["--model", "@model-copy"], ["model-copy", "corrupted"]),
    "resume target missing": ({}, ["--resume", "@no-checkpoint"], ["no-checkpoint", "not found"]),
    "non-finite yaml floats": ({"n.yaml": b"max_grad_norm: .nan\nepochs: .inf\nmemory_limit: .inf\n"},
                               ["--config", "@n.yaml"],
                               ["max_grad_norm: must be a finite number", "epochs: must be a finite",
                                "memory_limit: must be a finite"]),
    "json nested 10,000 deep": ({"deep.jsonl": (GOOD_ROW + "\n" + "[" * 10_000 + "]" * 10_000
                                                + "\n").encode()},
                                ["--data", "@deep.jsonl"], ["deep.jsonl:2", "nested too deeply"]),
    "json array nested deep": ({"deep.json": ("[" + GOOD_ROW + ", " + "[" * 10_000 + "]" * 10_000
                                              + "]").encode()},
                               ["--data", "@deep.json"], ["deep.json:1 (row 2)", "nested too deeply"]),
    "lone surrogate": ({"s.jsonl": (GOOD_ROW + '\n{"prompt": "emoji \\ud83d cut", '
                                    '"response": "x"}\n').encode()},
                       ["--data", "@s.jsonl"], ["s.jsonl:2", "field 'prompt'", "lone surrogate"]),
    "whitespace-only prompt": ({"w.jsonl": (GOOD_ROW + '\n{"prompt": " \\t ", "response": "x"}\n'
                                            ).encode()},
                               ["--data", "@w.jsonl"], ["w.jsonl:2", "field 'prompt'", "whitespace"]),
    "whitespace-only answer": ({"a.jsonl": (GOOD_ROW + '\n{"prompt": "q", "response": "\\n "}\n'
                                            ).encode()},
                               ["--data", "@a.jsonl"], ["a.jsonl:2", "field 'response'", "empty"]),
    "duplicate json key": ({"k.jsonl": (GOOD_ROW + '\n{"prompt": "a", "response": "b", '
                                        '"prompt": "c"}\n').encode()},
                           ["--data", "@k.jsonl"], ["k.jsonl:2", "field 'prompt'", "twice"]),
    "template: no": ({"t.yaml": b"template: no\n"}, ["--config", "@t.yaml"],
                     ["template:", "got 'no'", "t.yaml"]),
    "10 MB yaml value": ({"big.yaml": b"preset: " + b"x" * 10_000_000 + b"\n"},
                         ["--config", "@big.yaml"], ["preset:", "10000002 characters"]),
    "yaml alias bomb": ({"bomb.yaml": ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                                       + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n"
                                                 for p, c in zip("abcdefgh", "bcdefghi"))).encode()},
                        ["--config", "@bomb.yaml"], ["bomb.yaml", "alias"]),
    "damaged checkpoint": ({"out/checkpoint-2/trainer_state.json": b"{not json",
                            "out/checkpoint-2/adapter_model.safetensors": b"x"},
                           ["--resume", "auto"], ["checkpoint-2", "damaged"]),
}


def _break_model_copy(case, tiny_model, tmp_path):
    """The model-directory cases start from a copy of tiny-glm with one part broken."""
    import shutil

    if case not in ("tokenizer missing", "corrupted weights"):
        return
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model, copy)
    if case == "tokenizer missing":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (copy / name).unlink(missing_ok=True)
    else:
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, run_cli, tiny_model, tmp_path):
    files, argv, expected = BAD_INPUTS[case]
    files = {"good.jsonl": (GOOD_ROW + "\n").encode(), **files}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    _break_model_copy(case, tiny_model, tmp_path)
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("earlier work")
    before = snapshot(out)
    defaults = {"--data": str(tmp_path / "good.jsonl"), "--model": str(tiny_model)}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    code, _, err = run_cli("train", "--output-dir", out, *argv)
    assert code == 2, err
    assert "Traceback" not in err and len(err) < 5000  # a hostile value is never echoed whole
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert snapshot(out) == before


def test_debug_shows_the_traceback(tmp_path):
    from glmtune.cli import main

    # --debug re-raises glmtune's own error (a traceback) instead of printing one line
    with pytest.raises(GlmtuneError, match="missing.jsonl"):
        main(["--debug", "train", "--data", str(tmp_path / "missing.jsonl"),
              "--output-dir", str(tmp_path / "out")])


def test_help_imports_no_torch():
    # --help must stay instant; how fast is for bench/, what it loads is checked here
    code = subprocess.run([sys.executable, "-c", "import sys; from glmtune.cli import main\n"
                           "try: main(['--help'])\nexcept SystemExit: pass\n"
                           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert "train" in code.stdout


def test_data_triplets_command(run_cli, tmp_path):
    code, stdout, _ = run_cli("data", "triplets", "--out", tmp_path, "--train", "12", "--val", "3")
    assert code == 0
    assert len((tmp_path / "train_triplet.jsonl").read_text("utf-8").splitlines()) == 12
    assert len((tmp_path / "val_triplet.jsonl").read_text("utf-8").splitlines()) == 3
    assert "wrote 12 rows" in stdout


def test_make_vars_listing_comes_from_the_schema(run_cli):
    code, stdout, _ = run_cli("config", "--make-vars")
    assert code == 0
    for var in ("MODEL", "DATA", "NUM_EPOCHS", "LEARNING_RATE", "QUANT_LEVEL", "NUM_THREADS", "PROMPT"):
        assert var in stdout


@pytest.mark.parametrize("argv, world, flags, env, expected", [
    (["train", "--data", "my data.jsonl"], 1, "", {},
     "glmtune train --data 'my data.jsonl' --resume auto"),
    (["train", "--resume", "auto"], 1, "--batch-size 2 --grad-accum 4", {},
     "glmtune train --resume auto --batch-size 2 --grad-accum 4"),
    (["train"], 2, "", {}, "torchrun --nproc_per_node=2 -m glmtune train --resume auto"),
    (["train", "--from-make"], 1, "", {"NUM_EPOCHS": "3"}, "make train NUM_EPOCHS=3 RESUME=auto"),
    (["train", "--from-make"], 2, "", {}, "make train-ddp NPROC=2 RESUME=auto"),
    (["train", "--from-make"], 1, "--batch-size 1", {},
     "glmtune train --from-make --batch-size 1 --resume auto  # with the same Make variables"),
])
def test_the_resume_command_repeats_what_the_user_ran(argv, world, flags, env, expected, monkeypatch):
    from glmtune import cli
    from glmtune.config import TrainConfig, make_variables

    for var in make_variables(TrainConfig):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cli._resume_command(argv, world, flags) == expected
