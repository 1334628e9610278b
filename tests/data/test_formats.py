"""Tests for glmtune.data.formats.

The error tests check the message text on purpose: the message is the whole
user interface of a bad data file, and a DataError without the file, the line
and the field would leave the user searching a large file by hand.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from glmtune.data.formats import FORMATS, check_same_format, read_samples
from glmtune.data.sample import Message, Sample
from glmtune.errors import DataError

U, A, S = "user", "assistant", "system"


def conv(*pairs: tuple[str, str]) -> Sample:
    return Sample(messages=tuple(Message(r, c) for r, c in pairs))


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def as_jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def as_json(rows) -> str:
    # One element per line so that row N starts on line N + 1.
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def as_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


SERIALIZERS = {"jsonl": as_jsonl, "json": as_json, "csv": as_csv}

# (format, rows, expected samples, file types the format can be written in)
CASES = [
    ("text", [{"text": "hello world"}, {"text": "第二行"}],
     [Sample(text="hello world"), Sample(text="第二行")], ("jsonl", "json", "csv")),
    ("prompt_response",
     [{"prompt": "hi", "response": "hello"}, {"prompt": "2+2?", "response": "4"}],
     [conv((U, "hi"), (A, "hello")), conv((U, "2+2?"), (A, "4"))], ("jsonl", "json", "csv")),
    ("prompt_response", [{"query": "hi", "response": "hello"}],
     [conv((U, "hi"), (A, "hello"))], ("jsonl", "json", "csv")),
    ("prompt_response",
     [{"prompt": "and 3?", "response": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]},
      {"prompt": "q", "response": "a", "history": None}],
     [conv((U, "1+1?"), (A, "2"), (U, "2+2?"), (A, "4"), (U, "and 3?"), (A, "6")),
      conv((U, "q"), (A, "a"))], ("jsonl", "json")),
    ("alpaca",
     [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
      {"instruction": "Say hi", "input": "", "output": "hi"}],
     [conv((U, "Translate\nbonjour"), (A, "hello")), conv((U, "Say hi"), (A, "hi"))],
     ("jsonl", "json", "csv")),
    ("alpaca",
     [{"instruction": "Say hi", "output": "hi", "system": "Be brief."},
      {"instruction": "Say bye", "output": "bye", "system": ""}],
     [conv((S, "Be brief."), (U, "Say hi"), (A, "hi")), conv((U, "Say bye"), (A, "bye"))],
     ("jsonl", "json", "csv")),
    ("sharegpt",
     [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                         {"from": "user", "value": "bye"},
                         {"from": "assistant", "value": "ciao"}]},
      {"system": "Be kind.", "conversations": [{"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"}]},
      {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                         {"from": "gpt", "value": "a"}]}],
     [conv((U, "hi"), (A, "hello"), (U, "bye"), (A, "ciao")),
      conv((S, "Be kind."), (U, "q"), (A, "a")),
      conv((S, "sys"), (U, "q"), (A, "a"))], ("jsonl", "json")),
    ("openai",
     [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}]},
      {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}],
     [conv((S, "sys"), (U, "q"), (A, "a")), conv((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"))],
     ("jsonl", "json")),
]

PARAMS = [pytest.param(fmt, rows, want, ext, id=f"{fmt}-{i}-{ext}")
          for i, (fmt, rows, want, exts) in enumerate(CASES) for ext in exts]


@pytest.mark.parametrize("fmt, rows, want, ext", PARAMS)
def test_each_format_and_file_type(tmp_path, fmt, rows, want, ext):
    path = write(tmp_path, f"data.{ext}", SERIALIZERS[ext](rows))
    assert read_samples(path) == (want, fmt)


def test_formats_tuple_covers_every_case():
    assert set(FORMATS) == {fmt for fmt, *_ in CASES}


def test_txt_one_sample_per_nonblank_line(tmp_path):
    path = write(tmp_path, "corpus.TXT", "first line\r\n\n   \nsecond  line \n")
    assert read_samples(path) == ([Sample(text="first line"), Sample(text="second  line ")],
                                  "text")


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = write(tmp_path, "d.jsonl",
                 b"\xef\xbb\xbf" + as_jsonl([{"text": "a"}]).replace("\n", "\r\n").encode())
    assert read_samples(str(path)) == ([Sample(text="a")], "text")


def test_csv_extra_columns_capitalised_headers_and_multiline_cells(tmp_path):
    content = 'id, Prompt ,Response,source\n1,hi,"line one\nline two",web\n\n2,q,"a, b",x\n'
    path = write(tmp_path, "d.csv", content)
    assert read_samples(path) == (
        [conv((U, "hi"), (A, "line one\nline two")), conv((U, "q"), (A, "a, b"))],
        "prompt_response")


def test_alpaca_with_text_column_is_alpaca(tmp_path):
    # The Stanford Alpaca release ships a rendered "text" field next to the
    # real fields; reading it as plain text would train on the template.
    rows = [{"instruction": "i", "input": "", "output": "o", "text": "### i ### o"}]
    path = write(tmp_path, "d.jsonl", as_jsonl(rows))
    assert read_samples(path) == ([conv((U, "i"), (A, "o"))], "alpaca")


def test_unknown_keys_are_ignored(tmp_path):
    rows = [{"id": 7, "messages": [{"role": "user", "content": "q", "name": "x"},
                                   {"role": "assistant", "content": "a", "weight": 1}]}]
    path = write(tmp_path, "d.jsonl", as_jsonl(rows))
    assert read_samples(path)[0] == [conv((U, "q"), (A, "a"))]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "txt"])
def test_max_samples_caps(tmp_path, ext):
    rows = [{"text": f"t{i}"} for i in range(5)]
    content = "\n".join(r["text"] for r in rows) if ext == "txt" else SERIALIZERS[ext](rows)
    path = write(tmp_path, f"d.{ext}", content)
    assert read_samples(path, max_samples=2) == ([Sample(text="t0"), Sample(text="t1")], "text")
    assert len(read_samples(path, max_samples=100)[0]) == 5


def test_max_samples_stops_before_later_garbage(tmp_path):
    # What makes a quick trial run on a huge file cheap: rows after the cap
    # are never parsed.
    path = write(tmp_path, "d.jsonl", as_jsonl([{"text": "a"}, {"text": "b"}]) + "{oops\n")
    assert read_samples(path, max_samples=2)[0] == [Sample(text="a"), Sample(text="b")]
    with pytest.raises(DataError, match="d.jsonl:3"):
        read_samples(path)


def test_max_samples_still_validates_returned_rows(tmp_path):
    path = write(tmp_path, "d.jsonl", as_jsonl([{"prompt": "q", "response": 3}]))
    with pytest.raises(DataError, match="response"):
        read_samples(path, max_samples=1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_samples_must_be_positive_int(tmp_path, bad):
    path = write(tmp_path, "d.txt", "x\n")
    with pytest.raises(ValueError):
        read_samples(path, max_samples=bad)


def test_check_same_format(tmp_path):
    check_same_format("alpaca", "alpaca", tmp_path / "val.jsonl")
    with pytest.raises(DataError) as info:
        check_same_format("prompt_response", "text", tmp_path / "val.jsonl")
    message = str(info.value)
    assert "val.jsonl" in message and "text" in message and "prompt_response" in message
    with pytest.raises(ValueError):
        check_same_format("alpaca", "nope", "val.jsonl")


def test_json_row_errors_give_element_line_and_row(tmp_path):
    path = write(tmp_path, "d.json", as_json([{"text": "a"}, {"text": "b"}, {"text": 5}]))
    with pytest.raises(DataError) as info:
        read_samples(path)
    assert info.value.line == 4 and info.value.file == str(path)
    assert "d.json:4 (row 3)" in str(info.value)


def test_single_line_json_array_still_locates_row(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"text": "a"}, {"text": ""}]))
    with pytest.raises(DataError, match=r"d\.json:1 \(row 2\): field 'text'"):
        read_samples(path)


ROW_PR = {"prompt": "q", "response": "a"}
ALP = {"instruction": "i", "output": "o"}


def share(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# (file name, content, substrings the message must contain)
BAD = [
    ("empty.jsonl", "", ["empty.jsonl", "is empty"]),
    ("blank.jsonl", "\n  \n", ["blank.jsonl", "is empty"]),
    ("empty.txt", "\n\n", ["empty.txt", "is empty"]),
    ("empty.json", "[]", ["empty.json", "is empty"]),
    ("header_only.csv", "prompt,response\n", ["header_only.csv", "is empty"]),
    ("bad.jsonl", as_jsonl([ROW_PR, ROW_PR]) + '{"prompt": "q",\n',
     ["bad.jsonl:3", "invalid JSON"]),
    ("bad.json", '[\n{"text": "a"},\n{"text": "b"\n]\n', ["bad.json:4", "invalid JSON"]),
    ("trailing_comma.json", '[\n{"text": "a"},\n]\n', ["trailing_comma.json:3", "invalid JSON"]),
    ("missing.jsonl", as_jsonl([ROW_PR, {"prompt": "q"}]),
     ["missing.jsonl:2", "'response'", "missing", "line 1", "prompt_response"]),
    ("missing_first.jsonl", as_jsonl([{"response": "a"}]),
     ["missing_first.jsonl:1", "'prompt'", "missing"]),
    ("empty_cell.csv", "prompt,response\nq,a\nq,\n", ["empty_cell.csv:3", "'response'", "empty"]),
    ("missing_column.csv", "prompt,answer\nq,a\n",
     ["missing_column.csv:1", "'response'", "header"]),
    ("wrongtype.jsonl", as_jsonl([ROW_PR, {"prompt": "q", "response": 42}]),
     ["wrongtype.jsonl:2", "'response'", "number", "a string"]),
    ("wrongtype_history.jsonl", as_jsonl([{**ROW_PR, "history": [["q", 1]]}]),
     ["wrongtype_history.jsonl:1", "'history[0][1]'", "a string"]),
    ("history_pair.jsonl", as_jsonl([{**ROW_PR, "history": [["only one"]]}]),
     ["history_pair.jsonl:1", "'history[0]'", "pair"]),
    ("data.xls", "whatever", ["data.xls", ".jsonl", ".csv", ".xlsx"]),
    ("noext", "whatever", ["noext", ".jsonl"]),
    ("noheader.csv", "what is 2+2?,4\nhi,hello\n", ["noheader.csv:1", "header"]),
    ("history.csv", "prompt,response,history\nq,a,x\n", ["history.csv:1", "'history'", "CSV"]),
    ("cells.csv", "prompt,response\nq,a,b\n", ["cells.csv:2", "3 cells", "quote"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     ["latin1.jsonl:2", "UTF-8"]),
    ("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16"), ["utf16.jsonl:1", "UTF-16"]),
    ("mixed.jsonl", as_jsonl([ROW_PR, ROW_PR, ALP]),
     ["mixed.jsonl:3", "'prompt'", "alpaca", "prompt_response", "line 1"]),
    ("mixed.json", as_json([ALP, {"text": "t"}]),
     ["mixed.json:3 (row 2)", "'instruction'", "text", "alpaca", "row 1"]),
    ("unknown.jsonl", as_jsonl([{"question": "q", "answer": "a"}]),
     ["unknown.jsonl:1", "'question'", "conversations", "instruction"]),
    ("notobject.jsonl", '["q", "a"]\n', ["notobject.jsonl:1", "array", "object"]),
    ("badrole.jsonl", as_jsonl([share(("human", "q"), ("bot", "a"))]),
     ["badrole.jsonl:1", "'conversations[1].from'", "'bot'", "'gpt'"]),
    ("badrole_openai.jsonl", as_jsonl([chat(("user", "q"), ("tool", "a"))]),
     ["badrole_openai.jsonl:1", "'messages[1].role'", "'tool'"]),
    ("alternate.jsonl", as_jsonl([chat(("user", "q"), ("user", "q2"), ("assistant", "a"))]),
     ["alternate.jsonl:1", "'messages[1].role'", "alternat"]),
    ("starts_assistant.jsonl", as_jsonl([share(("gpt", "a"), ("human", "q"))]),
     ["starts_assistant.jsonl:1", "'conversations[0].from'", "'human'"]),
    ("ends_user.jsonl", as_jsonl([chat(("user", "q"), ("assistant", "a"), ("user", "q2"))]),
     ["ends_user.jsonl:1", "'messages[2].role'", "ends with a user"]),
    ("late_system.jsonl", as_jsonl([chat(("user", "q"), ("system", "s"), ("assistant", "a"))]),
     ["late_system.jsonl:1", "'messages[1].role'", "system"]),
    ("two_systems.jsonl",
     as_jsonl([{"system": "s", **share(("system", "s2"), ("human", "q"), ("gpt", "a"))}]),
     ["two_systems.jsonl:1", "'conversations[0].from'", "system"]),
    ("empty_reply.jsonl", as_jsonl([chat(("user", "q"), ("assistant", "  "))]),
     ["empty_reply.jsonl:1", "'messages[1].content'", "empty"]),
    ("empty_conv.jsonl", as_jsonl([{"messages": []}]), ["empty_conv.jsonl:1", "'messages'"]),
    ("content_type.jsonl", as_jsonl([{"messages": [{"role": "user", "content": None}]}]),
     ["content_type.jsonl:1", "'messages[0].content'", "null", "a string"]),
    ("conv_type.jsonl", as_jsonl([{"conversations": "hi"}]),
     ["conv_type.jsonl:1", "'conversations'", "array"]),
    ("object.json", '{"text": "a"}\n', ["object.json:1", "not an array"]),
    ("jsonl_as.json", '{"text": "a"}\n{"text": "b"}\n', ["jsonl_as.json:2", ".jsonl"]),
    ("array_as.jsonl", as_json([{"text": "a"}]), ["array_as.jsonl:1", ".json"]),
]


@pytest.mark.parametrize("name, content, needles", [pytest.param(*b, id=b[0]) for b in BAD])
def test_bad_inputs(tmp_path, name, content, needles):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert info.value.file == str(path)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_samples(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="directory"):
        read_samples(tmp_path / "dir.jsonl")


# --- files our users have (issue 13, failure 9) -------------------------------------------

GBK_ROWS = "prompt,response\n北京是哪国的首都？,中国\n上海在哪里？,中国东部\n"


def test_gb18030_text_is_read_in_auto_and_refused_with_a_hint_in_utf8(tmp_path, caplog):
    from glmtune.data.formats import read_samples

    caplog.set_level("INFO", logger="glmtune")
    path = tmp_path / "excel.csv"
    path.write_bytes(GBK_ROWS.encode("gbk"))
    samples, fmt = read_samples(path)
    assert fmt == "prompt_response" and samples[0].messages[0].content == "北京是哪国的首都？"
    assert "read as GB18030" in caplog.text
    assert read_samples(path, encoding="gb18030")[0] == samples
    with pytest.raises(DataError, match=r"excel.csv:2: .*not valid UTF-8; .*--encoding gb18030"):
        read_samples(path, encoding="utf-8")


def test_bytes_that_are_neither_utf8_nor_gb18030(tmp_path):
    from glmtune.data.formats import read_samples

    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:1: .*nor GB18030"):
        read_samples(path)


def test_xlsx_first_sheet_with_header_row(tmp_path):
    from openpyxl import Workbook

    from glmtune.data.formats import read_samples

    book = Workbook()
    sheet = book.active
    sheet.append([])  # a blank first row: the header is the first non-empty one
    sheet.append(["Prompt ", "Response"])
    sheet.append(["1+1=?", 2])
    sheet.append(["北京？", "中国"])
    book.create_sheet("ignored").append(["text"])
    path = tmp_path / "d.xlsx"
    book.save(path)
    samples, fmt = read_samples(path)
    assert fmt == "prompt_response"
    assert [(s.messages[0].content, s.messages[1].content) for s in samples] == [
        ("1+1=?", "2"), ("北京？", "中国")]
    sheet.append(["no answer", None])
    book.save(path)
    with pytest.raises(DataError, match=r"d.xlsx:5 \(row 5\): field 'response'"):
        read_samples(path)


def test_parquet_flat_and_nested_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from glmtune.data.formats import read_samples

    flat = tmp_path / "flat.parquet"
    pq.write_table(pa.table({"instruction": ["翻译", "总结"], "input": ["hello", None],
                             "output": ["你好", "好"]}), flat)
    samples, fmt = read_samples(flat)
    assert fmt == "alpaca" and samples[0].messages[0].content == "翻译\nhello"
    nested = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]]}), nested)
    with pytest.raises(DataError, match=r"chat.parquet:2 \(row 2\): field 'messages\[1\]"):
        read_samples(nested)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read_samples(broken)
