"""ROUGE-1/2/L and BLEU-4 of generated answers, for Chinese as for any other text.

The numbers follow what THUDM's ChatGLM fine-tuning scripts and LLaMA-Factory
report, so results can be set beside theirs: every example is scored on its
own, the scores are averaged and shown in percent.

- ROUGE-1/2/L F-measure on words: jieba segmentation, whitespace dropped (they
  join jieba's words with spaces and hand them to ``rouge_chinese``).
- BLEU-4 on characters (they call ``nltk``'s ``sentence_bleu`` on ``list(text)``)
  with uniform weights and smoothing method 3 (NIST geometric: the k-th n-gram
  order without a match counts as 1 / (2^k * number of hypothesis n-grams)).

Written out here rather than imported: the formulas are short, and
``rouge_chinese`` / ``nltk`` would be two dependencies for thirty lines. One
deliberate difference: ``rouge_chinese`` counts each distinct n-gram once;
we clip repeated n-grams by their count in the reference, as Lin (2004) and
Google's ``rouge-score`` do. Both agree whenever no n-gram repeats.

Without jieba, ROUGE falls back to single characters as words (logged once):
scores then run higher than word-level ones and are not comparable with them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

log = logging.getLogger(__name__)

SEGMENTERS = ("auto", "jieba", "char")


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f: float


@lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError:
        log.info("jieba is not installed: ROUGE treats each character as a word, which scores "
                 "higher than the word-level ROUGE other tools report (pip install jieba)")
        return None
    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO
    return jieba


def segmenter_in_use(segmenter: str = "auto") -> str:
    if segmenter not in SEGMENTERS:
        raise ValueError(f"segmenter must be one of {SEGMENTERS}, got {segmenter!r}")
    if segmenter == "auto":
        return "jieba" if _jieba() is not None else "char"
    return segmenter


def words(text: str, segmenter: str = "auto") -> list[str]:
    """Words of ``text`` for ROUGE: jieba's (or single characters), whitespace dropped."""
    if segmenter_in_use(segmenter) == "jieba":
        jieba = _jieba()
        if jieba is None:
            raise RuntimeError("segmenter 'jieba' asked for, but jieba is not installed")
        pieces = jieba.lcut(text)
    else:
        pieces = list(text)
    return [w for w in (p.strip() for p in pieces) if w]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _prf(overlap: int, hyp_total: int, ref_total: int) -> PRF:
    precision = overlap / hyp_total if hyp_total else 0.0
    recall = overlap / ref_total if ref_total else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PRF(precision, recall, f)


def rouge_n(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> PRF:
    """ROUGE-N of two token lists; repeated n-grams count up to their reference count."""
    hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
    overlap = sum(min(count, ref[gram]) for gram, count in hyp.items())
    return _prf(overlap, sum(hyp.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> PRF:
    """ROUGE-L: longest common subsequence over hypothesis / reference length."""
    return _prf(lcs_length(hypothesis, reference), len(hypothesis), len(reference))


def bleu4(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-4 against one reference, smoothed as nltk's method 3 does."""
    if not hypothesis:
        return 0.0
    precisions: list[tuple[int, int]] = []
    for n in range(1, 5):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        precisions.append((matched, max(1, sum(hyp.values()))))
    if precisions[0][0] == 0:
        # No shared token at all: nltk answers 0 here instead of a smoothed score.
        return 0.0
    log_sum, k = 0.0, 1
    for matched, total in precisions:
        if matched:
            p = matched / total
        else:
            p = 1 / (2 ** k * total)
            k += 1
        log_sum += 0.25 * math.log(p)
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_sum)


def sentence_scores(prediction: str, reference: str, segmenter: str = "auto") -> dict[str, float]:
    """One example's ROUGE-1/2/L F and BLEU-4, as fractions in [0, 1]."""
    hyp_words, ref_words = words(prediction, segmenter), words(reference, segmenter)
    if hyp_words and ref_words:
        r1, r2 = rouge_n(hyp_words, ref_words, 1).f, rouge_n(hyp_words, ref_words, 2).f
        rl = rouge_l(hyp_words, ref_words).f
    else:
        r1 = r2 = rl = 0.0
    return {"rouge-1": r1, "rouge-2": r2, "rouge-l": rl,
            "bleu-4": bleu4(list(prediction), list(reference))}


METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def score(predictions: Sequence[str], references: Sequence[str],
          segmenter: str = "auto") -> dict:
    """Mean ROUGE-1/2/L F and BLEU-4 over examples, in percent, plus n and the segmenter."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references; they must pair up")
    used = segmenter_in_use(segmenter)
    totals = dict.fromkeys(METRICS, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in sentence_scores(prediction, reference, used).items():
            totals[name] += value
    n = len(references)
    result: dict = {name: round(100 * totals[name] / n, 4) if n else 0.0 for name in METRICS}
    result.update(n=n, segmenter=used)
    return result
