"""`glmtune eval`: scores, files written, base-model comparison."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from glmtune.config import EvalConfig, PredictConfig
from glmtune.errors import DataError, GlmtuneError
from glmtune.evaluate.run import evaluate
from tests.conftest import read_jsonl, snapshot


class ScriptedPredictor:
    """Answers from a script, so scores can be worked out by hand."""

    def __init__(self, answers, base_answers=None):
        self.answers, self.base_answers = answers, base_answers
        self.in_base = False
        self.source = type("Source", (), {"name": "scripted-base"})()

    def conversation_ids(self, messages):
        return messages  # the "ids" are the conversation itself: enough to look answers up

    def generate_ids(self, prompts, batch_size=8, on_batch=None):
        script = self.base_answers if self.in_base else self.answers
        return [script[messages[-1].content] for messages in prompts]

    @contextmanager
    def base_model(self):
        self.in_base = True
        try:
            yield self
        finally:
            self.in_base = False


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def test_triplet_scores_by_hand(tmp_path):
    data = write_rows(tmp_path / "val.jsonl", [
        {"prompt": "q1", "response": "(甲, 国籍, 中国)\n(甲, 行业, 科技)"},
        {"prompt": "q2", "response": "(乙, 首都, 北京)"},
        {"prompt": "q3", "response": "无"},
    ])
    answers = {"q1": "（甲，国籍，中国）", "q2": "(乙, 首都, 上海)", "q3": "无"}
    base = {"q1": "无", "q2": "无", "q3": "无"}
    out = tmp_path / "eval"
    result = evaluate(EvalConfig(adapter="my-adapter", data=str(data), output_dir=str(out),
                                 compare_base=True),
                      predictor=ScriptedPredictor(answers, base))
    adapter, base_scores = result.scores["adapter"], result.scores["base"]
    # gold 3 triplets; predicted 2: one right (q1), one wrong (q2) -> P 1/2, R 1/3
    assert (adapter.precision, adapter.recall) == pytest.approx((1 / 2, 1 / 3))
    assert adapter.f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert adapter.exact_match == pytest.approx(1 / 3)  # only q3 (无 = 无)
    assert (base_scores.precision, base_scores.recall, base_scores.exact_match) == (0, 0, 1 / 3)

    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["prompt"] for r in rows] == ["q1", "q2", "q3"]
    assert rows[0]["prediction"] == answers["q1"] and rows[0]["base_prediction"] == "无"
    assert [r["exact_match"] for r in rows] == [False, False, True]
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    assert metrics["scores"]["adapter"]["recall"] == pytest.approx(1 / 3)
    assert metrics["models"] == {"adapter": "my-adapter", "base": "scripted-base"}
    report = (out / "report.txt").read_text("utf-8")
    assert report.strip() == result.report.strip()
    assert "adapter" in report and "base" in report and "国籍" in report


def test_generation_task_scores_rouge_and_bleu(tmp_path):
    data = write_rows(tmp_path / "val.jsonl", [
        {"instruction": "天气", "output": "今天天气不错"},
        {"instruction": "复述", "output": "完全相同"},
    ])
    answers = {"天气": "今天天气很好", "复述": "完全相同"}
    result = evaluate(EvalConfig(adapter="a", data=str(data), task="generation",
                                 output_dir=str(tmp_path / "eval")),
                      predictor=ScriptedPredictor(answers))
    scores = result.scores["adapter"]
    assert scores["n"] == 2
    assert scores["bleu-4"] == pytest.approx(100 * (0.508133 + 1) / 2, abs=1e-3)
    assert 0 < scores["rouge-1"] <= 100 and "rouge-l" in result.report


def test_plain_text_data_has_nothing_to_score(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [{"text": "只是一段文字"}])
    with pytest.raises(DataError) as info:
        evaluate(EvalConfig(adapter="a", data=str(data)), predictor=ScriptedPredictor({}))
    assert str(data) in str(info.value) and "reference" in str(info.value)


def test_compare_base_needs_an_adapter():
    with pytest.raises(GlmtuneError, match="compare_base"):
        EvalConfig(adapter="", model="tiny-glm", compare_base=True).validate()


def test_eval_cli_with_compare_base(adapter, tiny_model, triplet_dir, run_cli, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        "eval", "--task", "triplet", "--adapter", adapter, "--model", tiny_model,
        "--data", triplet_dir / "val_triplet.jsonl", "--max-samples", 3, "--max-new-tokens", 6,
        "--output-dir", out, "--compare-base", "--bf16", "false", "--batch-size", 2,
        "--threads", 1)
    assert code == 0, err
    assert "adapter" in stdout and "base" in stdout and "f1" in stdout
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 3 and all("base_prediction" in r for r in rows)

    # The adapter switched off is exactly the bare base model.
    from glmtune.infer.predict import Predictor

    bare = Predictor(PredictConfig(adapter="", model=str(tiny_model), max_new_tokens=6,
                                   bf16="false", threads=1))
    assert [r["base_prediction"] for r in rows] == [bare.generate(r["prompt"]) for r in rows]
    # ...and the adapter really changes the answers, or the comparison would prove nothing
    assert [r["prediction"] for r in rows] != [r["base_prediction"] for r in rows]


def test_eval_cli_bad_data_is_one_clear_error(adapter, run_cli, tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2"}\n', "utf-8")
    out = tmp_path / "eval"
    code, _, err = run_cli("eval", "--adapter", adapter, "--data", data, "--output-dir", out)
    assert code == 2 and "val.jsonl:2" in err and "response" in err
    assert snapshot(out) == {}
