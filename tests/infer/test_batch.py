"""Batched generation and `glmtune predict --file`: equal answers, resumable output."""

from __future__ import annotations

import json

import pytest

from glmtune.config import PredictConfig
from glmtune.errors import DataError, GlmtuneError
from glmtune.infer.batch import batch_predict, read_prompts
from glmtune.infer.predict import Predictor
from tests.conftest import read_jsonl

PROMPTS = ["你好", "请从以下文本中抽取三元组，格式为(主体, 关系, 客体):\n苹果公司是一家美国的科技公司。",
           "北京是中国的首都。", "a", "马云创立了阿里巴巴集团。"]


@pytest.fixture(scope="module")
def predictor(adapter, tiny_model):
    # float32: batched greedy decoding is only promised to match one-at-a-time there.
    # One thread: on a busy 2-core machine two OpenMP threads wait on each other for
    # milliseconds per operation, which makes a tiny model's generation crawl.
    return Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model),
                                   max_new_tokens=8, bf16="false", threads=1))


def test_batched_answers_equal_one_at_a_time(predictor):
    single = [predictor.generate(p) for p in PROMPTS]
    # batch_size 3 mixes prompt lengths within a batch, so left padding is exercised
    assert predictor.generate_batch(PROMPTS, batch_size=3) == single
    history = [("你好", single[0])]
    assert predictor.generate_batch(["再见", "a"], histories=[history, ()]) == [
        predictor.generate("再见", history), single[3]]


class CountingPredictor:
    """Answers "answer to <prompt>"; raises KeyboardInterrupt after ``stop_after`` answers."""

    def __init__(self, stop_after=None):
        self.asked, self.stop_after = [], stop_after

    def generate(self, prompt, history=()):
        if self.stop_after is not None and len(self.asked) == self.stop_after:
            raise KeyboardInterrupt
        self.asked.append(prompt)
        return f"answer to {prompt}"


def test_interrupted_batch_resumes_where_it_stopped(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一\n\n二\n三\n四\n", "utf-8")
    out = tmp_path / "out" / "answers.jsonl"
    config = PredictConfig(adapter="unused", file=str(prompts), out=str(out))

    first = CountingPredictor(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        batch_predict(config, predictor=first)
    assert [r["prompt"] for r in read_jsonl(out)] == ["一", "二"]  # flushed before the kill

    # a kill in the middle of a write leaves a line without its newline
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"line": 4, "prompt": "三", "ans')
    second = CountingPredictor()
    result = batch_predict(config, predictor=second)
    assert second.asked == ["三", "四"]
    assert (result.answered, result.skipped, result.total) == (2, 2, 4)
    assert [(r["line"], r["prompt"], r["answer"]) for r in read_jsonl(out)] == [
        (1, "一", "answer to 一"), (3, "二", "answer to 二"),
        (4, "三", "answer to 三"), (5, "四", "answer to 四")]

    third = CountingPredictor()
    assert batch_predict(config, predictor=third).answered == 0 and third.asked == []


def test_changed_input_is_not_mixed_with_old_answers(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("一\n二\n", "utf-8")
    config = PredictConfig(adapter="unused", file=str(prompts), out=str(tmp_path / "o.jsonl"))
    batch_predict(config, predictor=CountingPredictor())
    prompts.write_text("一\n改了\n", "utf-8")
    with pytest.raises(GlmtuneError, match=r"o.jsonl:2: answers line 2"):
        batch_predict(config, predictor=CountingPredictor())


def test_jsonl_prompts_with_history_and_references(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "再见", "history": [["你好", "你好！"]], "response": "拜拜"}),
        json.dumps("只是字符串"),
        json.dumps({"instruction": "翻译", "input": "hello"}),
    ]) + "\n", "utf-8")
    rows = read_prompts(str(path))
    assert [(r.line, r.prompt) for r in rows] == [(1, "再见"), (2, "只是字符串"), (3, "翻译\nhello")]
    assert rows[0].history == (("你好", "你好！"),) and rows[0].reference == "拜拜"


@pytest.mark.parametrize("name, content, expected", [
    ("p.jsonl", '{"prompt": "ok"}\n{"question": "x"}\n', ["p.jsonl:2", "prompt"]),
    ("p.jsonl", '{"prompt": 3}\n', ["p.jsonl:1", "'prompt'", "a string"]),
    ("p.jsonl", '{"prompt": "ok"}\n{oops\n', ["p.jsonl:2", "invalid JSON"]),
    ("p.jsonl", '{"prompt": "q", "history": [["only one"]]}\n', ["p.jsonl:1", "history"]),
    ("p.csv", "prompt\nx\n", ["p.csv", ".txt", ".jsonl"]),
    ("p.txt", "\n  \n", ["p.txt", "no prompts"]),
])
def test_bad_prompt_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, "utf-8")
    with pytest.raises(DataError) as info:
        read_prompts(str(path))
    for part in expected:
        assert part in str(info.value)


def test_batch_output_must_be_jsonl(run_cli, tmp_path):
    code, _, err = run_cli("predict", "--file", tmp_path / "p.txt", "--out", tmp_path / "o.txt")
    assert code == 2 and "out" in err and ".jsonl" in err


def test_predict_file_cli_end_to_end(adapter, tiny_model, predictor, run_cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n北京是中国的首都。\n", "utf-8")
    out = tmp_path / "answers.jsonl"
    argv = ["predict", "--adapter", adapter, "--model", tiny_model, "--file", prompts,
            "--out", out, "--max-new-tokens", 8, "--bf16", "false", "--threads", 1]
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    assert "2 answered" in stdout
    assert [r["answer"] for r in read_jsonl(out)] == [predictor.generate("你好"),
                                                  predictor.generate("北京是中国的首都。")]
    code, stdout, _ = run_cli(*argv)
    assert code == 0 and "0 answered, 2 already answered" in stdout
    assert len(read_jsonl(out)) == 2
