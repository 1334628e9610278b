"""``glmtune predict --file``: answer a file of prompts, resumably.

Each answer is appended to the output as one JSON line and flushed to disk
before the next prompt starts, so an interrupted run loses at most the answer
it was generating. A rerun reads what is already there and answers only the
rest; the output is append-only, which is why it is not written through a
temporary file like the other artifacts (a half-written last line from a kill
is the one thing repaired, by an atomic rewrite of the lines before it).

Rows are keyed by their line number in the input. A rerun checks that every
answered line still holds the same prompt, so answers from an edited input
file are never mixed with answers to the new one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from glmtune import atomic
from glmtune.config import PredictConfig
from glmtune.data.formats import _Loc, _read_text, check_unicode, content_lines, jsonl_value
from glmtune.errors import DataError, GlmtuneError
from glmtune.lock import output_lock

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "query", "instruction")
JSONL_ROW = ('a JSON string, or an object with "prompt" (or "query", or "instruction" plus '
             'optional "input") and optional "history": [[question, answer], ...]')


@dataclass(frozen=True)
class PromptRow:
    line: int                                # 1-based line in the input file: the row's key
    prompt: str
    history: tuple[tuple[str, str], ...] = ()
    reference: str | None = None             # the row's own "response"/"output", if it has one


@dataclass
class BatchResult:
    out: Path
    total: int
    answered: int   # in this run
    skipped: int    # answered by an earlier run


def default_output(file: str) -> Path:
    path = Path(file)
    return path.with_name(path.stem + ".predictions.jsonl")


def read_prompts(file: str) -> list[PromptRow]:
    """Prompts of a .txt (one per non-blank line) or .jsonl file, with their line numbers."""
    suffix = Path(file).suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(file, f"unsupported prompt file type {suffix or '(no extension)'!r}",
                        expected=".txt (one prompt per line) or .jsonl (one row per line)")
    text = _read_text(file)
    rows = []
    for number, raw in content_lines(text):
        if suffix == ".txt":
            rows.append(PromptRow(number, raw.rstrip("\r")))
        else:
            rows.append(_jsonl_row(file, number, raw))
    if not rows:
        raise DataError(file, "has no prompts", expected="at least one non-blank line")
    return rows


def _jsonl_row(file: str, number: int, raw: str) -> PromptRow:
    value = jsonl_value(file, number, raw, JSONL_ROW)
    if isinstance(value, str):
        check_unicode(value, _Loc(file, number), "prompt")
        return PromptRow(number, value)
    if not isinstance(value, dict):
        raise DataError(file, f"row is a JSON {type(value).__name__}", line=number,
                        expected=JSONL_ROW)
    key = next((k for k in PROMPT_KEYS if k in value), None)
    if key is None:
        keys = ", ".join(repr(k) for k in value) or "none"
        raise DataError(file, f"no prompt field (keys: {keys})", line=number, expected=JSONL_ROW)
    prompt = value[key]
    if not isinstance(prompt, str):
        raise DataError(file, f"is {type(prompt).__name__}", line=number, field=key,
                        expected="a string")
    extra = value.get("input") if key == "instruction" else None
    if extra is not None and not isinstance(extra, str):
        raise DataError(file, f"is {type(extra).__name__}", line=number, field="input",
                        expected="a string")
    if extra and extra.strip():
        prompt = f"{prompt}\n{extra}"  # as alpaca rows are read for training
    check_unicode(prompt, _Loc(file, number), key)
    if not prompt.strip():
        raise DataError(file, "is empty or only whitespace", line=number, field=key,
                        expected="a prompt to answer")
    history = value.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            for pair in history):
        raise DataError(file, "is not a list of [question, answer] string pairs", line=number,
                        field="history", expected="[[question, answer], ...]")
    reference = value.get("response", value.get("output"))
    return PromptRow(number, prompt, tuple((q, a) for q, a in history),
                     reference if isinstance(reference, str) else None)


def _answered(out: Path, rows: list[PromptRow], file: str) -> set[int]:
    """Input lines already answered in ``out``; drops a last line cut off by a kill."""
    if not out.exists():
        return set()
    if out.is_dir():
        raise GlmtuneError(f"{out}: is a directory; --out must be a .jsonl file")
    # errors="replace": a kill can cut a multi-byte character; only the cut line has it
    *complete, tail = out.read_text(encoding="utf-8", errors="replace").split("\n")
    by_line = {row.line: row for row in rows}
    done = set()
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("line"), int):
            raise DataError(out, "is not an answer written by `glmtune predict --file`",
                            line=number, expected='{"line": N, "prompt": ..., "answer": ...}; '
                            "choose another --out or delete this file")
        row = by_line.get(record["line"])
        if row is None or row.prompt != record.get("prompt"):
            raise GlmtuneError(
                f"{out}:{number}: answers line {record['line']} of an earlier version of {file}, "
                "whose prompt there has changed since; delete the file or choose another --out "
                "to start over")
        done.add(row.line)
    if tail:
        # Every answer is written with its newline in one call, so a line without one is
        # the write a kill interrupted; its prompt is answered again.
        log.info("%s: dropping a half-written last answer (interrupted run)", out)
        atomic.write_text(out, "".join(line + "\n" for line in complete))
    return done


def batch_predict(config: PredictConfig, predictor=None) -> BatchResult:
    """Answer every prompt of ``config.file`` not yet answered in the output file."""
    config = config.validate()
    if not config.file:
        raise GlmtuneError("file: batch prediction needs --file with the prompts")
    rows = read_prompts(config.file)
    out = Path(config.out) if config.out else default_output(config.file)
    with output_lock(out, "glmtune predict --file"):
        return _answer_rest(config, rows, out, predictor)


def _answer_rest(config: PredictConfig, rows: list[PromptRow], out: Path,
                 predictor) -> BatchResult:
    done = _answered(out, rows, config.file)
    todo = [row for row in rows if row.line not in done]
    if done:
        log.info("%s: %d of %d prompts already answered; answering the other %d",
                 out, len(done), len(rows), len(todo))
    if todo and predictor is None:
        from glmtune.infer.predict import Predictor

        predictor = Predictor(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        for count, row in enumerate(todo, start=1):
            answer = predictor.generate(row.prompt, row.history)
            record = {"line": row.line, "prompt": row.prompt}
            if row.history:
                record["history"] = [list(pair) for pair in row.history]
            if row.reference is not None:
                record["reference"] = row.reference
            record["answer"] = answer
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            preview = answer.replace("\n", " ")
            log.info("[%d/%d] line %d: %s", len(done) + count, len(rows), row.line,
                     preview if len(preview) <= 60 else preview[:57] + "...")
    return BatchResult(out, len(rows), len(todo), len(done))
