"""ROUGE-1/2/L and BLEU-4 against values worked out by hand."""

from __future__ import annotations

import logging
import math

import pytest

from glmtune.evaluate import generation as g


def f1(p, r):
    return 2 * p * r / (p + r)


def test_rouge_n_clips_repeated_ngrams():
    # hyp a b a b / ref a b c: unigrams a2 b2 vs a1 b1 c1 -> overlap 2 of 4 and of 3
    hyp, ref = list("abab"), list("abc")
    r1 = g.rouge_n(hyp, ref, 1)
    assert (r1.precision, r1.recall) == pytest.approx((2 / 4, 2 / 3))
    assert r1.f == pytest.approx(f1(2 / 4, 2 / 3))
    # bigrams ab ba ab vs ab bc -> overlap 1 of 3 and of 2
    r2 = g.rouge_n(hyp, ref, 2)
    assert (r2.precision, r2.recall, r2.f) == pytest.approx((1 / 3, 1 / 2, f1(1 / 3, 1 / 2)))


def test_rouge_on_chinese_characters():
    hyp, ref = g.words("今天天气很好", "char"), g.words("今天天气不错", "char")
    assert hyp == list("今天天气很好")
    # unigrams: 今 天 天 气 shared (4 of 6 each side)
    assert g.rouge_n(hyp, ref, 1).f == pytest.approx(4 / 6)
    # bigrams: 今天 天天 天气 shared (3 of 5 each side)
    assert g.rouge_n(hyp, ref, 2).f == pytest.approx(3 / 5)
    # longest common subsequence 今天天气: 4 of 6
    assert g.rouge_l(hyp, ref).f == pytest.approx(4 / 6)


def test_rouge_l_is_a_subsequence_not_a_substring():
    hyp, ref = list("axbycz"), list("abc")
    assert g.lcs_length(hyp, ref) == 3
    assert g.rouge_l(hyp, ref).f == pytest.approx(f1(3 / 6, 3 / 3))


def test_bleu4_without_smoothing_needed():
    hyp, ref = list("今天天气很好"), list("今天天气不错")
    # p1 4/6, p2 3/5, p3 2/4 (今天天 天天气), p4 1/3 (今天天气); same length: no brevity penalty
    expected = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert g.bleu4(hyp, ref) == pytest.approx(expected)
    assert expected == pytest.approx(0.50813, abs=1e-5)


def test_bleu4_smoothing_and_brevity_penalty():
    hyp, ref = list("今天很好"), list("今天天气很好")
    # p1 4/4, p2 2/3 (今天 很好); p3 0 of 2 -> 1/(2^1 * 2); p4 0 of 1 -> 1/(2^2 * 1)
    # 4 characters against 6: brevity penalty exp(1 - 6/4)
    expected = math.exp(1 - 6 / 4) * (1 * 2 / 3 * 1 / 4 * 1 / 4) ** 0.25
    assert g.bleu4(hyp, ref) == pytest.approx(expected)
    assert expected == pytest.approx(0.27403, abs=1e-5)


@pytest.mark.parametrize("hyp, ref", [("", "今天"), ("明日", "今天")])
def test_bleu4_is_zero_without_shared_characters(hyp, ref):
    assert g.bleu4(list(hyp), list(ref)) == 0.0


def test_score_averages_examples_in_percent():
    result = g.score(["今天天气很好", "完全相同"], ["今天天气不错", "完全相同"], segmenter="char")
    assert result["n"] == 2 and result["segmenter"] == "char"
    assert result["rouge-1"] == pytest.approx(100 * (4 / 6 + 1) / 2, abs=1e-3)
    assert result["rouge-2"] == pytest.approx(100 * (3 / 5 + 1) / 2, abs=1e-3)
    assert result["rouge-l"] == pytest.approx(100 * (4 / 6 + 1) / 2, abs=1e-3)
    assert result["bleu-4"] == pytest.approx(100 * (0.508133 + 1) / 2, abs=1e-3)


def test_empty_answers_score_zero_and_lengths_must_match():
    assert g.score([" "], ["参考答案"], segmenter="char")["rouge-1"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        g.score(["a"], ["a", "b"])


def test_jieba_segments_words():
    pytest.importorskip("jieba")
    assert g.words("我爱北京天安门", "jieba") == ["我", "爱", "北京", "天安门"]
    assert g.segmenter_in_use("auto") == "jieba"
    # whitespace is never a word
    assert " " not in g.words("hello world 你好", "jieba")


def test_falls_back_to_characters_without_jieba(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_jieba(name, *args, **kwargs):
        if name == "jieba":
            raise ImportError("no jieba here")
        return real_import(name, *args, **kwargs)

    g._jieba.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_jieba)
    # the CLI stops glmtune's logs from propagating to the root logger caplog listens on
    monkeypatch.setattr(g.log, "handlers", [caplog.handler])
    monkeypatch.setattr(g.log, "level", logging.INFO)
    try:
        assert g.segmenter_in_use("auto") == "char"
        assert g.score(["北京"], ["北京"])["segmenter"] == "char"
        assert "jieba is not installed" in caplog.text
    finally:
        g._jieba.cache_clear()
