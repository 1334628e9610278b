"""Prediction with a trained adapter, through the CLI and the API."""

from __future__ import annotations

import shutil

import pytest

from glmtune.config import PredictConfig, TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.infer.predict import Predictor
from glmtune.train.recipe import FineTuner


@pytest.fixture(scope="module")
def adapter(tiny_model, triplet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "lora"
    FineTuner(TrainConfig(model=str(tiny_model), data=str(triplet_dir / "train_triplet.jsonl"),
                          output_dir=str(out), max_steps=2, batch_size=4, val_data="")).train()
    return out


def test_predict_cli_prints_and_writes_the_answer(adapter, tiny_model, run_cli, tmp_path):
    target = tmp_path / "output" / "prediction.txt"
    code, stdout, err = run_cli("predict", "--adapter", adapter, "--model", tiny_model,
                                "--prompt", "你好", "--max-new-tokens", "5", "--out", target)
    assert code == 0, err
    text = target.read_text("utf-8")
    assert text.startswith("prompt:\n你好\n") and "answer:\n" in text
    assert stdout.strip() in text


def test_predict_finds_the_base_model_from_the_adapter(adapter, tiny_model):
    # the adapter's saved config names the base it was trained on
    predictor = Predictor(PredictConfig(adapter=str(adapter), max_new_tokens=3))
    assert predictor.family.template == "glm4"
    assert predictor.source.path == str(tiny_model)
    explicit = Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model), max_new_tokens=3))
    assert predictor.generate("你好") == explicit.generate("你好")


def test_history_is_formatted_per_family(adapter, tiny_model):
    predictor = Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model)))
    ids = predictor.prompt_ids("再见", history=[("你好", "你好！")])
    text = predictor.tokenizer.decode(ids)
    assert text == "[gMASK]<sop><|user|>\n你好<|assistant|>\n你好！<|user|>\n再见<|assistant|>\n"


@pytest.mark.parametrize("case", ["missing", "no adapter config"])
def test_bad_adapter_dirs(case, run_cli, tiny_model, tmp_path):
    path = tmp_path / "adapter"
    if case == "no adapter config":
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"")
    code, _, err = run_cli("predict", "--adapter", path, "--model", tiny_model)
    assert code == 2 and str(path) in err
    assert ("not found" if case == "missing" else "adapter_config.json") in err


def test_adapter_for_another_base_is_refused(adapter, tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    config = AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 128, 256
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    with pytest.raises(GlmtuneError, match="different base model"):
        Predictor(PredictConfig(adapter=str(adapter), model=str(other)))


def test_prompt_beyond_the_context_is_refused_or_truncated(adapter, tiny_model, run_cli):
    """A 100,000-character prompt (~50x tiny-glm's 2048-token context; issue 13, failure 6)."""
    huge = "北京是中国的首都。" * 11_112
    common = ("predict", "--adapter", adapter, "--model", tiny_model, "--prompt", huge,
              "--max-new-tokens", 4, "--threads", 1)
    code, out, err = run_cli(*common)
    assert code == 2 and not out
    assert "do not fit the model's context of 2048 tokens" in err and "--long-prompt truncate" in err
    assert len(err) < 1000
    code, out, err = run_cli(*common, "--long-prompt", "truncate")
    assert code == 0, err
    assert "cut to its first" in err and "to fit the context of 2048 tokens" in err
