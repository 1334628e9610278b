"""``glmtune eval``: answer held-out prompts, score the answers, write what was scored.

The model is loaded once. With ``compare_base`` the same loaded model answers a
second time with its adapter switched off, so the base model is scored on
exactly the same prompts, template and generation settings, at no extra load.

Output (in ``output_dir``, each file written to a temporary sibling and renamed
into place): ``predictions.jsonl`` (one row per example: prompt, reference,
prediction, and the base model's prediction when compared), ``report.txt``
(what is printed) and ``metrics.json`` (the numbers, for scripts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from glmtune import atomic
from glmtune.config import EvalConfig
from glmtune.data.formats import read_samples
from glmtune.data.sample import Message
from glmtune.errors import DataError
from glmtune.evaluate import generation, triplet

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.txt"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Example:
    prompt: tuple[Message, ...]  # the conversation up to the answer (ends with a user turn)
    reference: str

    @property
    def question(self) -> str:
        return self.prompt[-1].content


@dataclass
class EvalResult:
    task: str
    n: int
    scores: dict[str, object]           # "adapter" (or "model") and, compared, "base"
    report: str
    output_dir: Path
    predictions: dict[str, list[str]] = field(default_factory=dict)


def load_examples(path: str, max_samples: int | None = None,
                  encoding: str = "auto") -> list[Example]:
    """Prompt / reference pairs from any conversation format ``glmtune train`` reads."""
    samples, fmt = read_samples(path, max_samples, encoding)
    if fmt == "text":
        raise DataError(path, "rows are plain text, so there is no reference answer to score",
                        field="text", expected="rows with a prompt and a reference answer: "
                        "prompt/response, instruction/output, conversations or messages")
    return [Example(s.messages[:-1], s.messages[-1].content) for s in samples]


def evaluate(config: EvalConfig, predictor=None) -> EvalResult:
    """Score ``config.adapter`` (and the base, if asked) on ``config.data``; write the files."""
    config = config.validate()
    examples = load_examples(config.data, config.max_samples, config.encoding)
    if predictor is None:
        from glmtune.infer.predict import Predictor

        predictor = Predictor(config.predict_config())
    ids = [predictor.conversation_ids(e.prompt) for e in examples]
    name = "adapter" if config.adapter else "model"
    runs = [(name, None)] + ([("base", predictor.base_model)] if config.compare_base else [])

    predictions: dict[str, list[str]] = {}
    for label, context in runs:
        log.info("%s: answering %d prompts from %s", label, len(ids), config.data)
        if context is None:
            predictions[label] = _answer(predictor, ids, config, label)
        else:
            with context():
                predictions[label] = _answer(predictor, ids, config, label)

    references = [e.reference for e in examples]
    if config.task == "triplet":
        scores = {label: triplet.score(p, references) for label, p in predictions.items()}
    else:
        scores = {label: generation.score(p, references) for label, p in predictions.items()}
    models = {name: config.adapter or predictor_model_name(predictor)}
    if config.compare_base:
        models["base"] = predictor_model_name(predictor)
    report = format_report(config.task, config.data, len(examples), scores, models)
    out = Path(config.resolved_output_dir)
    _write(out, examples, predictions, scores, report, config, models)
    return EvalResult(config.task, len(examples), scores, report, out, predictions)


def predictor_model_name(predictor) -> str:
    source = getattr(predictor, "source", None)
    return getattr(source, "name", None) or "base model"


def _answer(predictor, ids, config: EvalConfig, label: str) -> list[str]:
    def progress(done: int, total: int) -> None:
        log.info("%s: %d/%d answered", label, done, total)

    return predictor.generate_ids(ids, batch_size=config.batch_size, on_batch=progress)


# ------------------------------------------------------------------ reports
def summary_rows(task: str, scores: dict) -> list[tuple[str, list[str]]]:
    labels = list(scores)
    if task == "triplet":
        keys = [("precision", "precision"), ("recall", "recall"), ("f1", "f1"),
                ("exact match", "exact_match")]
        return [(title, [f"{getattr(scores[l], key):.4f}" for l in labels]) for title, key in keys]
    return [(metric, [f"{scores[l][metric]:.2f}" for l in labels]) for metric in generation.METRICS]


def format_report(task: str, data: str, n: int, scores: dict, models: dict[str, str]) -> str:
    """Summary table with one column per evaluated model, then the per-relation detail."""
    what = "triplet extraction" if task == "triplet" else "generation (ROUGE F / BLEU-4, %)"
    lines = [f"{what} on {data}: {n} examples"]
    lines += [f"  {label:<8} {model}" for label, model in models.items()]
    rows = summary_rows(task, scores)
    width = max(len(title) for title, _ in rows)
    col = max(8, *(len(l) for l in scores))
    lines += ["", " " * width + "  " + "  ".join(l.rjust(col) for l in scores)]
    lines += [title.ljust(width) + "  " + "  ".join(v.rjust(col) for v in values)
              for title, values in rows]
    if task == "triplet":
        for label, result in scores.items():
            lines += ["", triplet.format_report(result, title=f"{label}: {models[label]}")]
    else:
        segmenter = next(iter(scores.values()))["segmenter"]
        lines += ["", f"ROUGE words from {segmenter} segmentation; BLEU-4 on characters"]
    return "\n".join(lines)


def _write(out: Path, examples, predictions, scores, report, config: EvalConfig,
           models: dict[str, str]) -> None:
    labels = list(predictions)
    rows = []
    for i, example in enumerate(examples):
        row = {"prompt": example.question}
        if len(example.prompt) > 1:
            row["context"] = [{"role": m.role, "content": m.content} for m in example.prompt[:-1]]
        row["reference"] = example.reference
        row["prediction"] = predictions[labels[0]][i]
        if "base" in predictions:
            row["base_prediction"] = predictions["base"][i]
        if config.task == "triplet":
            gold = set(triplet.parse_triplets(example.reference))
            row["exact_match"] = set(triplet.parse_triplets(row["prediction"])) == gold
        rows.append(row)
    metrics = {
        "task": config.task, "data": config.data, "n": len(examples), "models": models,
        "scores": {label: (s.to_dict() if hasattr(s, "to_dict") else s)
                   for label, s in scores.items()},
    }
    with atomic.staging_dir(out) as staged:
        (staged / PREDICTIONS_FILE).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (staged / REPORT_FILE).write_text(report + "\n", encoding="utf-8")
        (staged / METRICS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
        atomic.publish_files(staged, out, last=METRICS_FILE)
