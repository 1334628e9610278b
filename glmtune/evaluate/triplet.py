"""Parse generated triplets and score them against references.

Models, especially small or freshly tuned ones, drift in surface form: they
switch to full-width punctuation, drop or add spaces and line breaks, repeat
a triplet.  None of that is an extraction error, so the parser forgives it;
what it does not forgive is a fragment that is not three parts, which is
dropped rather than guessed at.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field

Triplet = tuple[str, str, str]

_NO_TRIPLET = {"", "无", "無", "none", "无三元组"}
_PUNCT = str.maketrans({"（": "(", "）": ")", "，": ",", "、": ","})
_GROUP = re.compile(r"\(([^()]*)\)")
_SPACE = re.compile(r"\s+")


def _clean(part: str) -> str:
    return _SPACE.sub(" ", part).strip()


def parse_triplets(text: str) -> list[Triplet]:
    """Triplets in ``text`` in order of appearance, duplicates removed; [] for 无/empty."""
    if text is None:
        return []
    normalized = text.translate(_PUNCT)
    if _clean(normalized).rstrip("。.").lower() in _NO_TRIPLET:
        return []
    seen: set[Triplet] = set()
    out: list[Triplet] = []
    for group in _GROUP.findall(normalized):
        parts = [_clean(p) for p in group.split(",")]
        if len(parts) != 3 or not all(parts):
            continue
        triplet = (parts[0], parts[1], parts[2])
        if triplet not in seen:
            seen.add(triplet)
            out.append(triplet)
    return out


@dataclass
class TripletScores:
    precision: float
    recall: float
    f1: float
    exact_match: float
    n: int
    # relation -> {"tp", "fp", "fn", "precision", "recall", "f1", "support"}
    per_relation: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # 0/0 means "nothing to find and nothing claimed", which is perfect;
    # otherwise an empty denominator means one side is empty and the other
    # is not, which is a miss.
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(predictions: list[str], references: list[str]) -> TripletScores:
    """Micro P/R/F1 over per-example triplet sets, exact match and a per-relation breakdown."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references; they must pair up")
    tp = fp = fn = matches = 0
    counts: dict[str, dict[str, int]] = {}

    def bump(relation: str, key: str) -> None:
        counts.setdefault(relation, {"tp": 0, "fp": 0, "fn": 0})[key] += 1

    for prediction, reference in zip(predictions, references):
        pred = parse_triplets(prediction)
        gold = parse_triplets(reference)
        pred_set, gold_set = set(pred), set(gold)
        matches += pred_set == gold_set
        # Walk the ordered lists, not the sets, so per_relation's insertion
        # order (and so the report) never depends on hashing.
        for t in gold:
            if t in pred_set:
                tp += 1
                bump(t[1], "tp")
            else:
                fn += 1
                bump(t[1], "fn")
        for t in pred:
            if t not in gold_set:
                fp += 1
                bump(t[1], "fp")

    precision, recall, f1 = _prf(tp, fp, fn)
    per_relation: dict[str, dict] = {}
    order = sorted(counts, key=lambda r: (-(counts[r]["tp"] + counts[r]["fn"]), r))
    for relation in order:
        c = counts[relation]
        p, r, f = _prf(c["tp"], c["fp"], c["fn"])
        per_relation[relation] = {
            "tp": c["tp"], "fp": c["fp"], "fn": c["fn"],
            "precision": p, "recall": r, "f1": f, "support": c["tp"] + c["fn"],
        }
    n = len(references)
    return TripletScores(
        precision=precision, recall=recall, f1=f1,
        exact_match=matches / n if n else 0.0, n=n, per_relation=per_relation)


def _width(text: str) -> int:
    # CJK characters take two terminal columns; str.ljust would misalign them.
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    gap = " " * max(width - _width(text), 0)
    return gap + text if right else text + gap


def format_report(scores: TripletScores, title: str = "") -> str:
    """A plain-text summary plus one row per relation."""
    lines = []
    if title:
        lines += [title, "=" * max(_width(title), 8)]
    lines.append(f"examples     {scores.n}")
    lines.append(f"precision    {scores.precision:.4f}")
    lines.append(f"recall       {scores.recall:.4f}")
    lines.append(f"f1           {scores.f1:.4f}")
    lines.append(f"exact match  {scores.exact_match:.4f}")
    if scores.per_relation:
        name_w = max([_width("relation")] + [_width(r) for r in scores.per_relation])
        cols = ["support", "tp", "fp", "fn", "P", "R", "F1"]
        widths = [7, 5, 5, 5, 6, 6, 6]
        header = _pad("relation", name_w) + "  " + "  ".join(
            _pad(c, w, right=True) for c, w in zip(cols, widths))
        lines += ["", header, "-" * _width(header)]
        for relation, m in scores.per_relation.items():
            values = [str(m["support"]), str(m["tp"]), str(m["fp"]), str(m["fn"]),
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}"]
            lines.append(_pad(relation, name_w) + "  " + "  ".join(
                _pad(v, w, right=True) for v, w in zip(values, widths)))
    return "\n".join(lines)
