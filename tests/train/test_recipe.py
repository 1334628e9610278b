"""The training recipe end to end, on the real tiny-glm and real PEFT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from glmtune.config import PredictConfig, TrainConfig
from glmtune.data.dataset import IGNORE_INDEX
from glmtune.train.recipe import FineTuner

FAST = ("--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--max-seq-len", "128")


def train_argv(model, data, out, *extra):
    return ("train", "--model", model, "--data", data, "--output-dir", out, *FAST, *extra)


def test_cli_run_writes_exactly_the_expected_artifacts(run_cli, tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "adapter"
    code, stdout, err = run_cli(*train_argv(tiny_model, triplet_dir / "train_triplet.jsonl", out,
                                            "--eval-steps", "1"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
        "glmtune_config.yaml", "loss.png", "memory.csv", "metrics.jsonl", "tokenizer.json",
        "tokenizer_config.json"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1, 2]  # val sibling found
    assert all({"lr", "tokens_per_s", "rss_gb", "epoch"} <= set(r) for r in records if "loss" in r)
    saved = yaml.safe_load((out / "glmtune_config.yaml").read_text())
    assert saved["template"] == "glm4" and saved["max_steps"] == 2
    assert "loaded 40 rows from" in err and "trainable params:" in err
    assert "fast path: fused" in err  # on by default for CPU training
    assert "adapter saved to" in stdout
    assert not list(tmp_path.glob(".*tmp*")), "staging directories must not be left behind"


def test_adapter_reloads_through_plain_peft_with_identical_logits(tiny_model, triplet_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glmtune.infer.predict import Predictor

    out = tmp_path / "adapter"
    FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                          output_dir=str(out), max_steps=3, batch_size=4, val_data="")).train()
    predictor = Predictor(PredictConfig(adapter=str(out), model=str(tiny_model)))
    ids = torch.tensor([predictor.prompt_ids("苹果公司是一家美国的科技公司。")])

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        plain = PeftModel.from_pretrained(base, out).eval()
        plain_logits = plain(ids).logits
        ours = predictor.model(ids).logits
    assert torch.equal(plain_logits, ours)
    assert not torch.allclose(plain_logits, base_logits), "the adapter must change the model"


def _write(path: Path, rows, kind: str) -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(r["text"] + "\n" for r in rows), "utf-8")
    return path


QUESTION, ANSWER = "北京是哪个国家的首都？", "中国"
FORMATS = {
    "txt": ("txt", {"text": "北京是中国的首都。"}),
    "text-jsonl": ("jsonl", {"text": "北京是中国的首都。"}),
    "prompt_response-jsonl": ("jsonl", {"prompt": QUESTION, "response": ANSWER}),
    "prompt_response-csv": ("csv", {"prompt": QUESTION, "response": ANSWER}),
    "alpaca-json": ("json", {"instruction": QUESTION, "input": "", "output": ANSWER}),
    "sharegpt-jsonl": ("jsonl", {"conversations": [{"from": "human", "value": QUESTION},
                                                   {"from": "gpt", "value": ANSWER}]}),
    "openai-jsonl": ("jsonl", {"messages": [{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": ANSWER}]}),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_trains_one_step_on_the_response_only(name, tiny_model, tmp_path):
    kind, row = FORMATS[name]
    data = _write(tmp_path / f"train.{kind}", [row] * 4, kind)
    out = tmp_path / "out"
    tuner = FineTuner(TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(out),
                                  max_steps=1, batch_size=2))
    tuner.prepare_datasets()
    encoded = tuner.train_set.rows[0]
    tok = tuner.tokenizer
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(encoded.input_ids, encoded.labels))
    if "text" in row:  # plain text: every token is trained
        assert tok.decode(trained) == row["text"] + "<|endoftext|>"
    else:  # conversations: only the answer and the end-of-turn token
        assert tok.decode(trained) == ANSWER + "<|endoftext|>"
        prompt = tok.decode([t for t, lab in zip(encoded.input_ids, encoded.labels) if lab == IGNORE_INDEX])
        assert prompt == f"[gMASK]<sop><|user|>\n{QUESTION}<|assistant|>\n"
    result = tuner.train()
    assert result.steps == 1
    assert (out / "adapter_model.safetensors").is_file()


def test_long_rows_are_truncated_and_counted(tiny_model, tmp_path, caplog):
    rows = [{"prompt": "短问题", "response": "很长的回答" * 80}] * 3
    data = _write(tmp_path / "train.jsonl", rows, "jsonl")
    tuner = FineTuner(TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "o"),
                                  max_seq_len=32))
    tuner.prepare_datasets()
    assert tuner.train_set.truncated == 3
    assert all(len(r.input_ids) == 32 for r in tuner.train_set.rows)


def test_max_samples_caps_rows(tiny_model, triplet_dir, tmp_path):
    tuner = FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                                  output_dir=str(tmp_path / "o"), max_samples=5))
    tuner.prepare_datasets()
    assert len(tuner.train_set.rows) == 5


def test_finished_adapter_is_not_overwritten(run_cli, tiny_model, triplet_dir, tmp_path):
    from tests.conftest import snapshot

    out = tmp_path / "adapter"
    data = triplet_dir / "train_triplet.jsonl"
    assert run_cli(*train_argv(tiny_model, data, out))[0] == 0
    before = snapshot(out)
    code, _, err = run_cli(*train_argv(tiny_model, data, out, "--lr", "0.1"))
    assert code == 2 and "--overwrite" in err
    assert snapshot(out) == before
    code, _, err = run_cli(*train_argv(tiny_model, data, out, "--lr", "0.1", "--overwrite"))
    assert code == 0, err
    assert snapshot(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]


def test_gradient_accumulation_weighs_every_token_equally(tiny_model, triplet_dir, tmp_path):
    """The loss is the mean over the trained tokens of an optimizer step, however it is split.

    Micro-batches hold different numbers of answer tokens; averaging per
    micro-batch (what a naive loop does) would give a different loss.
    """
    def first_loss(name, batch, accum):
        out = tmp_path / name
        FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                              output_dir=str(out), max_steps=1, batch_size=batch, grad_accum=accum,
                              val_data="", bf16="false", max_samples=8, logging_steps=1)).train()
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss("one", 8, 1) == pytest.approx(first_loss("split", 2, 4), rel=1e-5)


def test_trained_tied_embeddings_stay_tied(tiny_model, triplet_dir, tmp_path):
    """A base whose LM head is its embedding matrix keeps one matrix when both are trained."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    config = AutoConfig.from_pretrained(tied)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    tuner = FineTuner(TrainConfig(model=str(tied), data=str(triplet_dir / "train_triplet.jsonl"),
                                  output_dir=str(tmp_path / "out"), max_steps=2, batch_size=4,
                                  val_data="", train_embeddings="true"))
    tuner.train()
    embed = tuner.model.get_input_embeddings().modules_to_save["default"].weight
    head = tuner.model.get_output_embeddings().modules_to_save["default"].weight
    assert embed.data_ptr() == head.data_ptr()


@pytest.mark.parametrize("val_data", ["auto", ""])
def test_every_step_runs_in_training_mode(val_data, tiny_model, triplet_dir, tmp_path):
    """Dropout and gradient checkpointing act only in training mode, and from_pretrained
    returns a model in eval mode. A run without validation data once trained in eval mode
    throughout: no dropout, and checkpointing silently off (6B at 4-bit: 2.2 GB over plan)."""
    modes = []

    def record(step, tuner):
        modules = list(tuner.model.modules())
        modes.append((sum(m.training for m in modules) == len(modules),
                      tuner.model.get_base_model().model.gradient_checkpointing))

    FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                          output_dir=str(tmp_path / "o"), max_steps=2, batch_size=2, val_data=val_data,
                          max_samples=8, lora_dropout=0.1, gradient_checkpointing=True),
              callbacks=[record]).train()
    assert modes == [(True, True), (True, True)]
