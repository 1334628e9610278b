"""Reading training/validation files into :class:`Sample` objects.

Users bring data in whatever shape their last tool produced (plain text,
ChatGLM's prompt/response, Alpaca, ShareGPT, OpenAI chat), so the row format is
detected from the first row instead of being configured. Every later row must
use that same format: a file that silently mixes shapes is almost always a
concatenation mistake, and training on half of it would hide the problem.

Every problem is a :class:`DataError` that names the file, the line (or, for a
``.json`` array, the line where the element starts plus its row number), the
field and what was expected, because the user has to find the offending row
in a file that may have millions of them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from glmtune.data.sample import Message, Sample
from glmtune.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("text", "prompt_response", "alpaca", "sharegpt", "openai")

EXTENSIONS = (".txt", ".csv", ".json", ".jsonl", ".xlsx", ".parquet")
ENCODINGS = ("auto", "utf-8", "gb18030")

# Keys that identify a format, tried in this order. Order matters: the
# Stanford Alpaca release carries a pre-rendered "text" column next to
# instruction/output, and that row must be read as alpaca, not as plain text.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("openai", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_response", ("prompt", "query", "response")),
    ("text", ("text",)),
)

# Required fields per format; a tuple groups aliases (any one satisfies it).
_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "text": (("text",),),
    "prompt_response": (("prompt", "query"), ("response",)),
    "alpaca": (("instruction",), ("output",)),
    "sharegpt": (("conversations",),),
    "openai": (("messages",),),
}

_NEEDS = {
    "text": "'text'",
    "prompt_response": "'prompt' (or 'query') and 'response', optionally 'history'",
    "alpaca": "'instruction' and 'output', optionally 'input' and 'system'",
    "sharegpt": "'conversations', optionally 'system'",
    "openai": "'messages'",
}

_SHAPES = (
    '{"text": ...}; '
    '{"prompt": ..., "response": ..., "history": [[q, a], ...]}; '
    '{"instruction": ..., "input": ..., "output": ...}; '
    '{"conversations": [{"from": "human", "value": ...}, ...]}; '
    '{"messages": [{"role": "user", "content": ...}, ...]}'
)

# Nested data cannot live in a CSV cell without inventing an encoding the
# user would have to guess, so these fields are refused rather than misread.
_CSV_UNSUPPORTED = ("history", "conversations", "messages")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
# How each role is spelled in the file, so errors use the user's vocabulary.
_SPELLING = {
    "sharegpt": {"user": "'human' (or 'user')", "assistant": "'gpt' (or 'assistant')"},
    "openai": {"user": "'user'", "assistant": "'assistant'"},
}

_JSON_WS = " \t\n\r"


# --------------------------------------------------------------------------
# Locations and error helpers


@dataclass(frozen=True)
class _Loc:
    path: str
    line: int
    row: int | None = None  # set only for .json arrays, where lines can be shared

    def label(self) -> str:
        if self.row is None:
            return f"line {self.line}"
        return f"row {self.row} (line {self.line})"

    def error(self, problem: str, *, field: str | None = None,
              expected: str | None = None) -> DataError:
        if self.row is None:
            return DataError(self.path, problem, line=self.line, field=field,
                             expected=expected)
        # A whole JSON array may sit on one line, so the row number is what
        # really locates the element; DataError only knows file[:line], so
        # the row goes into the location text and the attributes are fixed up.
        err = DataError(f"{self.path}:{self.line} (row {self.row})", problem,
                        field=field, expected=expected)
        err.file, err.line = self.path, self.line
        err.row = self.row  # type: ignore[attr-defined]
        return err


@dataclass(frozen=True)
class _Ctx:
    """What a row is checked against: the format and where it was detected."""

    fmt: str
    first: _Loc
    is_first: bool

    def expected(self, what: str) -> str:
        if self.is_first:
            return f"{what}; {self.fmt} rows need {_NEEDS[self.fmt]}"
        return f"{what}, as in {self.first.label()}, which is {self.fmt} format"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any, limit: int = 40) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wrong_type(loc: _Loc, field: str, value: Any, expected: str) -> DataError:
    got = _json_type(value)
    if value is not None:
        got += f" {_show(value)}"
    return loc.error(f"wrong type: got {got}", field=field, expected=expected)


# --------------------------------------------------------------------------
# Files -> raw rows


def _read_text(path: str, encoding: str = "auto") -> str:
    """The file's text: UTF-8 (a BOM is dropped), GB18030, or auto: UTF-8, else GB18030
    (what Chinese Excel and Windows save; GBK is a subset) with a note in the log."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, not a data file") from None
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror or e}") from None
    if encoding == "gb18030":
        return _decode(path, data, "gb18030")
    if data.startswith(b"\xef\xbb\xbf"):  # Windows editors add a UTF-8 BOM
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"byte 0x{data[e.start]:02x} is not valid UTF-8"
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            problem = "file is UTF-16 encoded; re-save it as UTF-8"
        elif encoding == "auto":
            try:
                text = data.decode("gb18030")
            except UnicodeDecodeError:
                problem += " (nor GB18030)"
            else:
                log.info("%s: not UTF-8; read as GB18030 (GBK), as saved by Chinese Excel and "
                         "Windows (--encoding gb18030 says so, --encoding utf-8 refuses)", path)
                return text
        else:
            problem += "; if it was saved by Chinese Excel or Windows, pass --encoding gb18030"
        raise DataError(path, problem, line=data.count(b"\n", 0, e.start) + 1,
                        expected="UTF-8 text" + (" or GB18030" if encoding == "auto" else "")
                        ) from None


def _decode(path: str, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(path, f"byte 0x{data[e.start]:02x} is not valid {encoding.upper()}",
                        line=data.count(b"\n", 0, e.start) + 1,
                        expected=f"{encoding.upper()} text (or --encoding auto)") from None


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _JSON_WS:
        i += 1
    return i


def _invalid_json(path: str, e: json.JSONDecodeError, expected: str) -> DataError:
    return DataError(path, f"invalid JSON: {e.msg} (column {e.colno})",
                     line=e.lineno, expected=expected)


def _rows_json(path: str, text: str) -> Iterator[tuple[_Loc, Any]]:
    """Walk the top-level array element by element.

    Decoding elements one at a time (rather than json.loads on the whole
    file) is what gives each row its starting line, and lets max_samples stop
    early without parsing the rest of a large file.
    """
    expected = "a JSON array of row objects: [{...}, {...}]"
    i = _skip_ws(text, 0)
    if i == len(text):
        raise DataError(path, "is empty", expected=expected)
    if text[i] != "[":
        try:
            value = _loads(text)
        except _JsonShapeError as e:
            raise e.at(_Loc(path, text.count("\n", 0, i) + 1)) from None
        except json.JSONDecodeError as e:
            if text[i] == "{":  # most likely JSON Lines saved as .json
                raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno}); if the "
                                "file has one object per line, name it .jsonl",
                                line=e.lineno, expected=expected) from None
            raise _invalid_json(path, e, expected) from None
        raise DataError(path, f"top level is {_json_type(value)}, not an array",
                        line=text.count("\n", 0, i) + 1, expected=expected)
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    line, pos = 1, 0
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    row = 0
    while True:
        start = _skip_ws(text, i)
        try:
            value, i = _shaped(decoder.raw_decode, text, start)
        except _JsonShapeError as e:
            raise e.at(_Loc(path, line + text.count("\n", pos, start), row + 1)) from None
        except json.JSONDecodeError as e:
            raise _invalid_json(path, e, expected) from None
        line += text.count("\n", pos, start)
        pos = start
        row += 1
        yield _Loc(path, line, row), value
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            break
        err = json.JSONDecodeError("Expecting ',' or ']' after an array element", text, i)
        raise _invalid_json(path, err, expected)
    i = _skip_ws(text, i + 1)
    if i < len(text):
        err = json.JSONDecodeError("Extra data after the top-level array", text, i)
        raise _invalid_json(path, err, expected)


class _JsonShapeError(ValueError):
    """Valid JSON that no row should be: a key given twice, or nesting beyond any row's."""

    def __init__(self, problem: str, field: str | None, expected: str):
        super().__init__(problem)
        self.problem, self.field, self.expected = problem, field, expected

    def at(self, loc: _Loc) -> DataError:
        return loc.error(self.problem, field=self.field, expected=self.expected)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = {}
    for key, value in pairs:
        if key in row:  # json keeps the last one silently; a CSV column twice is refused too
            raise _JsonShapeError("key appears twice in one object", key,
                                  "each key once (the second would silently win)")
        row[key] = value
    return row


def _shaped(decode, *args):
    try:
        return decode(*args)
    except RecursionError:
        raise _JsonShapeError("JSON is nested too deeply", None,
                              "a row object with at most a few levels of nesting") from None


def _loads(raw: str) -> Any:
    return _shaped(json.JSONDecoder(object_pairs_hook=_unique_keys).decode, raw)


def content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each line of ``text`` that is not blank."""
    # split("\n") rather than splitlines(): JSON strings may legally contain
    # raw U+2028 and friends, which splitlines() would treat as line breaks.
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            yield number, raw


def jsonl_value(path: str, number: int, raw: str, expected: str, hint: str = "") -> Any:
    """Line ``number`` of a JSON Lines file decoded; what is wrong with it is a DataError
    at that line (``hint`` added to an invalid-JSON message)."""
    try:
        return _loads(raw)
    except _JsonShapeError as e:
        raise e.at(_Loc(path, number)) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno}){hint}",
                        line=number, expected=expected) from None


def _rows_jsonl(path: str, text: str) -> Iterator[tuple[_Loc, Any]]:
    for row, (number, raw) in enumerate(content_lines(text)):
        array = row == 0 and raw.lstrip().startswith("[")
        hint = "; if the file is one JSON array, name it .json" if array else ""
        yield _Loc(path, number), jsonl_value(path, number, raw, "one JSON object per line", hint)


def _rows_csv(path: str, text: str) -> Iterator[tuple[_Loc, Any]]:
    # Long documents in a "text" column easily pass csv's 128 KiB cell limit;
    # raising it (never lowering) is harmless for everyone else in-process.
    if csv.field_size_limit() < 1 << 30:
        csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    end = 0  # physical line on which the previous record ended
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, f"malformed CSV: {e}", line=reader.line_num,
                            expected="comma-separated values, quoted with \"...\"") from None
        end = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank line
        if header is None:
            header, header_line = _csv_header(path, cells, start), start
            continue
        if len(cells) != len(header):
            raise DataError(
                path, f"has {len(cells)} cells but the header (line {header_line}) "
                f"has {len(header)} columns", line=start,
                expected="one cell per header column; quote values that contain "
                         "commas or line breaks")
        yield _Loc(path, start), {k: v for k, v in zip(header, cells) if k}
    if header is None:
        raise DataError(path, "is empty")


def _csv_header(path: str, cells: list[str], line: int) -> list[str]:
    # Spreadsheet exports often capitalise or pad headers ("Prompt ").
    names = [c.strip().lower() for c in cells]
    for name in _CSV_UNSUPPORTED:
        if name in names:
            raise DataError(path, "is not supported in CSV files", line=line, field=name,
                            expected="a .json or .jsonl file for nested conversation data")
    known = {k for _, keys in _SIGNATURES for k in keys} | {"input", "system"}
    seen: set[str] = set()
    for name in names:
        if name in known and name in seen:
            raise DataError(path, "column appears twice in the header", line=line,
                            field=name, expected="each column named once")
        seen.add(name)
    expected = ("a header row naming the columns: 'text', or 'prompt,response', "
                "or 'instruction,input,output'")
    fmt = _detect(dict.fromkeys(names))
    if fmt is None:
        raise DataError(
            path, f"first line is not a usable header: no known column in {_show(cells, 80)}",
            line=line, expected=expected)
    # A column missing from the header is missing from every row; saying so
    # once, at the header, beats blaming line 2 for it.
    for group in _REQUIRED[fmt]:
        if not any(k in names for k in group):
            raise DataError(path, f"header has no '{group[0]}' column", line=line,
                            field=group[0],
                            expected=f"{fmt} columns: {_NEEDS[fmt].split(', optionally')[0]}")
    return names


def _rows_txt(path: str, text: str) -> Iterator[tuple[_Loc, Any]]:
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r")
        if raw.strip():
            yield _Loc(path, number), {"text": raw}


def _table_rows(path: str, header: list | None, rows, offset: int) -> Iterator[tuple[_Loc, Any]]:
    """Rows of a spreadsheet or Parquet table as CSV rows are read: the header names the
    columns (checked like a CSV header), numbers become text, empty cells empty text."""
    def text(cell):
        if cell is None:
            return ""
        if isinstance(cell, float) and cell.is_integer():
            return str(int(cell))
        return cell if isinstance(cell, (str, list, dict)) else str(cell)

    names = _csv_header(path, [str(c if c is not None else "") for c in header], offset) \
        if header is not None else None
    for number, cells in rows:
        if not any(text(c) for c in cells):
            continue
        yield _Loc(path, number, number), {k: text(v) for k, v in zip(names, cells) if k}


def _open_table(path: str, module: str, opener, errors: tuple, kind: str, expected: str):
    """``opener(module)`` on ``path``; a missing package or an unreadable file is a DataError."""
    import importlib

    try:
        lib = importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(path, f"reading {Path(path).suffix} needs {package}",
                        expected=f"pip install {package} (see requirements.txt)") from None
    try:
        return opener(lib)
    except errors as e:
        raise DataError(path, f"not a readable {kind} ({_show(str(e), 80)})",
                        expected=expected) from None


def _rows_xlsx(path: str) -> Iterator[tuple[_Loc, Any]]:
    """The first sheet; its first non-empty row is the header. Locations are sheet rows."""
    import zipfile

    book = _open_table(path, "openpyxl",
                       lambda lib: lib.load_workbook(path, read_only=True, data_only=True),
                       (OSError, zipfile.BadZipFile, KeyError, ValueError), ".xlsx workbook",
                       "an Excel 2007+ workbook; save .xls files as .xlsx")
    try:
        numbered = ((n, list(r)) for n, r in enumerate(book.worksheets[0].iter_rows(
            values_only=True), start=1))
        for number, cells in numbered:
            if any(c is not None and str(c).strip() for c in cells):
                yield from _table_rows(path, cells, numbered, number)
                return
        raise DataError(path, "is empty", expected="a header row, then one row per example")
    finally:
        book.close()


def _rows_parquet(path: str) -> Iterator[tuple[_Loc, Any]]:
    """Every row group in order; locations are 1-based row numbers."""
    # pyarrow's ArrowInvalid is a ValueError
    table = _open_table(path, "pyarrow.parquet", lambda pq: pq.ParquetFile(path),
                        (OSError, ValueError), "Parquet file",
                        "a Parquet table with one row per example")
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            if not isinstance(row, dict) or not any(v not in (None, "") for v in row.values()):
                continue
            # nested columns (conversations, messages) arrive as lists of dicts, like JSON
            yield _Loc(path, number, number), {str(k).strip().lower(): v for k, v in row.items()}


_READERS = {".txt": _rows_txt, ".csv": _rows_csv, ".json": _rows_json,
            ".jsonl": _rows_jsonl}
_BINARY_READERS = {".xlsx": _rows_xlsx, ".parquet": _rows_parquet}


# --------------------------------------------------------------------------
# Raw rows -> samples


def _detect(row: dict) -> str | None:
    for fmt, keys in _SIGNATURES:
        if any(k in row for k in keys):
            return fmt
    return None


def _check_required(row: dict, loc: _Loc, ctx: _Ctx) -> None:
    missing = [group for group in _REQUIRED[ctx.fmt] if not any(k in row for k in group)]
    if not missing:
        return
    field = missing[0][0]
    problem = "missing"
    if len(missing) > 1:
        problem += " (and so is " + ", ".join(f"'{g[0]}'" for g in missing[1:]) + ")"
    other = _detect(row)
    if not ctx.is_first and other is not None and other != ctx.fmt:
        problem += f"; this row looks like {other} format, but a file must use one format"
    what = "an array" if field in ("conversations", "messages") else "a string"
    raise loc.error(problem, field=field, expected=ctx.expected(what))


def _string(row: dict, key: str, loc: _Loc, *, optional: bool = False,
            path: str | None = None) -> str | None:
    value = row.get(key)
    if value is None and optional:  # null is how many exporters write "absent"
        return None
    if not isinstance(value, str):
        raise _wrong_type(loc, path or key, value, "a string" + (" or null" if optional else ""))
    check_unicode(value, loc, path or key)
    return value


def check_unicode(value: str, loc: "_Loc", field: str) -> None:
    """A lone surrogate (a JSON ``\\ud83d`` without its pair: half an emoji) breaks tokenizers."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise loc.error(f"contains a lone surrogate {value[e.start]!r} at character {e.start} "
                        "(half of an emoji or other character; the text was cut or mis-encoded)",
                        field=field, expected="valid Unicode text") from None


@dataclass(frozen=True)
class _Turn:
    role: str
    content: str
    role_field: str     # where the role came from, for error messages
    content_field: str
    spelled: str = ""   # the role as written in the file


def _conversation(turns: list[_Turn], loc: _Loc, container: str,
                  fmt: str) -> tuple[Message, ...]:
    spelling = _SPELLING.get(fmt, {"user": "'user'", "assistant": "'assistant'"})
    shape = "an optional system message, then user and assistant turns alternating, " \
            "starting with user and ending with assistant"
    systems = [k for k, t in enumerate(turns) if t.role == "system"]
    for k in systems:
        if k != 0:
            problem = ("second system message" if systems[0] == 0
                       else f"system message at position {k}")
            raise loc.error(problem + "; only the first message may be a system message",
                            field=turns[k].role_field, expected=shape)
    body = turns[1:] if systems else turns
    if not body:
        raise loc.error("has no user/assistant turns", field=container,
                        expected="at least a user message and an assistant reply")
    want = "user"
    for turn in body:
        if turn.role != want:
            got = turn.spelled or turn.role
            article = "an" if want == "assistant" else "a"
            raise loc.error(f"is {got!r}, but {article} {want} turn ({spelling[want]}) "
                            "must come here",
                            field=turn.role_field, expected=shape)
        if turn.role == "assistant" and not turn.content.strip():
            raise loc.error("assistant reply is empty", field=turn.content_field,
                            expected="non-empty text: the reply is what the model learns")
        if turn.role == "user" and not turn.content.strip():
            raise loc.error("user message is empty or only whitespace", field=turn.content_field,
                            expected="non-empty text: the prompt the reply answers")
        want = "assistant" if want == "user" else "user"
    last = body[-1]
    if last.role != "assistant":
        raise loc.error("conversation ends with a user message", field=last.role_field,
                        expected="the last message to be an assistant reply, "
                                 "since only replies are trained")
    return tuple(Message(t.role, t.content) for t in turns)


def _text_sample(row: dict, loc: _Loc) -> Sample:
    text = _string(row, "text", loc)
    if not text.strip():
        raise loc.error("is empty", field="text", expected="non-empty text")
    return Sample(text=text)


def _prompt_response_sample(row: dict, loc: _Loc) -> Sample:
    key = "prompt" if "prompt" in row else "query"
    prompt = _string(row, key, loc)
    response = _string(row, "response", loc)
    turns: list[_Turn] = []
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _wrong_type(loc, "history", history,
                              "an array of [question, answer] pairs, or null")
        for i, pair in enumerate(history):
            where = f"history[{i}]"
            if not isinstance(pair, list):
                raise _wrong_type(loc, where, pair, "a [question, answer] pair of strings")
            if len(pair) != 2:
                raise loc.error(f"has {len(pair)} item(s)", field=where,
                                expected="a [question, answer] pair of strings")
            for j, part in enumerate(pair):
                if not isinstance(part, str):
                    raise _wrong_type(loc, f"{where}[{j}]", part, "a string")
            turns.append(_Turn("user", pair[0], f"{where}[0]", f"{where}[0]"))
            turns.append(_Turn("assistant", pair[1], f"{where}[1]", f"{where}[1]"))
    turns.append(_Turn("user", prompt, key, key))
    turns.append(_Turn("assistant", response, "response", "response"))
    return Sample(messages=_conversation(turns, loc, "history", "prompt_response"))


def _alpaca_sample(row: dict, loc: _Loc) -> Sample:
    instruction = _string(row, "instruction", loc)
    extra = _string(row, "input", loc, optional=True)
    output = _string(row, "output", loc)
    system = _string(row, "system", loc, optional=True)
    user = instruction + ("\n" + extra if extra and extra.strip() else "")
    turns = []
    if system and system.strip():
        turns.append(_Turn("system", system, "system", "system"))
    turns.append(_Turn("user", user, "instruction", "instruction"))
    turns.append(_Turn("assistant", output, "output", "output"))
    return Sample(messages=_conversation(turns, loc, "instruction", "alpaca"))


def _message_list(row: dict, loc: _Loc, container: str, role_key: str,
                  content_key: str, roles: dict[str, str], fmt: str) -> list[_Turn]:
    items = row.get(container)
    if not isinstance(items, list):
        raise _wrong_type(loc, container, items, "an array of message objects")
    allowed = ", ".join(repr(r) for r in roles)
    turns = []
    for i, item in enumerate(items):
        where = f"{container}[{i}]"
        if not isinstance(item, dict):
            raise _wrong_type(loc, where, item,
                              f'an object like {{"{role_key}": ..., "{content_key}": ...}}')
        if role_key not in item:
            raise loc.error("missing", field=f"{where}.{role_key}", expected=f"one of {allowed}")
        spelled = item[role_key]
        if not isinstance(spelled, str):
            raise _wrong_type(loc, f"{where}.{role_key}", spelled, f"one of {allowed}")
        if spelled not in roles:
            raise loc.error(f"unknown role {spelled!r}", field=f"{where}.{role_key}",
                            expected=f"one of {allowed}")
        if content_key not in item:
            raise loc.error("missing", field=f"{where}.{content_key}", expected="a string")
        content = item[content_key]
        if not isinstance(content, str):
            raise _wrong_type(loc, f"{where}.{content_key}", content, "a string")
        turns.append(_Turn(roles[spelled], content, f"{where}.{role_key}",
                           f"{where}.{content_key}", spelled))
    return turns


def _sharegpt_sample(row: dict, loc: _Loc) -> Sample:
    system = _string(row, "system", loc, optional=True)
    turns = _message_list(row, loc, "conversations", "from", "value",
                          _SHAREGPT_ROLES, "sharegpt")
    if system and system.strip():
        if turns and turns[0].role == "system":
            raise loc.error("second system message: the row already has a 'system' field",
                            field=turns[0].role_field,
                            expected="the system prompt in one place only")
        turns.insert(0, _Turn("system", system, "system", "system"))
    return Sample(messages=_conversation(turns, loc, "conversations", "sharegpt"))


def _openai_sample(row: dict, loc: _Loc) -> Sample:
    turns = _message_list(row, loc, "messages", "role", "content", _OPENAI_ROLES, "openai")
    return Sample(messages=_conversation(turns, loc, "messages", "openai"))


_CONVERTERS = {
    "text": _text_sample,
    "prompt_response": _prompt_response_sample,
    "alpaca": _alpaca_sample,
    "sharegpt": _sharegpt_sample,
    "openai": _openai_sample,
}


# --------------------------------------------------------------------------
# Public API


def read_samples(path, max_samples: int | None = None,
                 encoding: str = "auto") -> tuple[list[Sample], str]:
    """Read a data file, auto-detecting its extension and row format.

    Returns ``(samples, format_name)`` with ``format_name`` one of FORMATS
    (``.txt`` files are always "text"). ``max_samples`` keeps only the first
    rows; reading stops there, so problems further down go unnoticed, which
    is the point of a quick trial run. Raises DataError for anything wrong
    with the file, ValueError for a bad ``max_samples``.
    """
    if max_samples is not None and (isinstance(max_samples, bool)
                                    or not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None and suffix not in _BINARY_READERS:
        raise DataError(path, f"unsupported file type {suffix or '(no extension)'!r}",
                        expected="one of " + ", ".join(EXTENSIONS))
    if reader is None:
        if not Path(path).is_file():
            raise DataError(path, "file not found")
        text, rows = None, _BINARY_READERS[suffix](path)
    else:
        text = _read_text(path, encoding)
        rows = reader(path, text)

    samples: list[Sample] = []
    ctx: _Ctx | None = None
    for loc, row in rows:
        if not isinstance(row, dict):
            raise loc.error(f"row is {_json_type(row)} {_show(row)}, not an object",
                            expected="a JSON object such as " + _SHAPES.split("; ")[1])
        if ctx is None:
            fmt = _detect(row)
            if fmt is None:
                keys = ", ".join(repr(k) for k in row) or "none"
                raise loc.error(f"unrecognised row format (keys: {keys})",
                                expected=f"one of these shapes: {_SHAPES}")
            ctx = _Ctx(fmt, loc, is_first=True)
        elif ctx.is_first:
            ctx = _Ctx(ctx.fmt, ctx.first, is_first=False)
        _check_required(row, loc, ctx)
        samples.append(_CONVERTERS[ctx.fmt](row, loc))
        if max_samples is not None and len(samples) >= max_samples:
            break
    if ctx is None:
        raise DataError(path, "is empty" if not (text or "").strip() else "is empty: it has no rows",
                        expected="at least one row")
    return samples, ctx.fmt


def check_same_format(train_format: str, val_format: str, val_path) -> None:
    """Refuse a validation file whose rows differ in format from training.

    Plain text trains on every token while conversations train only on the
    replies, so a validation loss measured on the other kind would not be
    comparable with the training loss; and between conversation formats a
    mismatch is far more often the wrong file than a deliberate choice.
    """
    for name in (train_format, val_format):
        if name not in FORMATS:
            raise ValueError(f"unknown data format {name!r}; expected one of {FORMATS}")
    if train_format != val_format:
        raise DataError(val_path,
                        f"rows are {val_format} format but the training file's rows are "
                        f"{train_format} format",
                        expected=f"{train_format} rows, the same format as the training data")
