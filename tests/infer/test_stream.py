"""Predictor.run / Predictor.stream: pieces, stop strings, per-row limits, sampling, cancelling."""

from __future__ import annotations

import pytest

from glmtune.config import PredictConfig
from glmtune.infer.predict import Predictor, Sampling

PROMPTS = ["你好", "北京是中国的首都。", "a"]


@pytest.fixture(scope="module")
def predictor(adapter, tiny_model):
    # float32 and one thread, as in test_batch: batched greedy answers are exact there
    return Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model),
                                   max_new_tokens=12, bf16="false", threads=1))


def test_stream_pieces_join_to_the_answer(predictor):
    pieces = list(predictor.stream("你好"))
    assert len(pieces) > 1  # really streamed, not one piece at the end
    assert "".join(pieces) == predictor.generate("你好")


def test_stream_of_encoded_conversation(predictor):
    from glmtune.data.sample import Message

    ids = predictor.conversation_ids([Message("system", "你是助手"), Message("user", "你好")])
    assert "".join(predictor.stream("", ids=ids)) == predictor.run(
        [ids], [Sampling()])[0].text


def test_stop_string_cuts_the_answer_streamed_or_not(predictor):
    full = predictor.run([predictor.prompt_ids("你好")], [Sampling()])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 12
    stop = full.text[len(full.text) // 2:][:2]
    cut = full.text[:full.text.find(stop)].rstrip()
    answer = predictor.run([predictor.prompt_ids("你好")], [Sampling(stop=(stop,))])[0]
    assert (answer.text, answer.finish_reason) == (cut, "stop")
    assert answer.completion_tokens < full.completion_tokens  # generation really stopped
    assert "".join(predictor.stream("你好", sampling=Sampling(stop=(stop,)))) == cut


def test_rows_keep_their_own_limits_in_a_batch(predictor):
    ids = [predictor.prompt_ids(p) for p in PROMPTS]
    limits = [3, 12, 7]
    alone = [predictor.run([i], [Sampling(max_new_tokens=n)])[0] for i, n in zip(ids, limits)]
    together = predictor.run(ids, [Sampling(max_new_tokens=n) for n in limits])
    assert together == alone
    assert [a.completion_tokens for a in alone] == limits
    assert [a.prompt_tokens for a in alone] == [len(i) for i in ids]


def test_sampling_with_a_seed_repeats(predictor):
    ids = [predictor.prompt_ids("你好")]
    hot = Sampling(temperature=1.5, top_p=0.95, seed=3)
    first = predictor.run(ids, [hot])[0].text
    assert predictor.run(ids, [hot])[0].text == first
    others = {predictor.run(ids, [Sampling(temperature=1.5, seed=s)])[0].text for s in range(4)}
    assert len(others) > 1  # the seed matters, so this is really sampling
    with pytest.raises(ValueError, match="share one Sampling"):
        predictor.run(ids * 2, [hot, Sampling(temperature=1.0)])


def test_cancelled_row_ends_alone(predictor):
    ids = [predictor.prompt_ids(p) for p in PROMPTS[:2]]
    answers = predictor.run(ids, [Sampling()] * 2, cancelled=lambda row: row == 0)
    assert (answers[0].finish_reason, answers[0].completion_tokens) == ("cancelled", 1)
    assert answers[1] == predictor.run(ids[1:], [Sampling()])[0]


def test_closing_a_stream_stops_its_generation(predictor, monkeypatch):
    answers = []
    real_run = predictor.run
    monkeypatch.setattr(predictor, "run", lambda *a, **k: answers.extend(real_run(*a, **k)))
    stream = predictor.stream("你好", max_new_tokens=500)
    next(stream)
    stream.close()  # waits for the generating thread
    assert answers[0].finish_reason == "cancelled" and answers[0].completion_tokens < 500
