"""Answers finished as THUDM's chat() finishes them, whole and streamed.

ChatGLM-6B's tokenizer normalizes "，" to "," (NFKC), so the model writes ASCII
punctuation; its chat() (process_response) strips the answer, fills in the
"[[训练时间]]" placeholder and turns , ! : ; ? next to a Chinese character back into
full width. The expected strings below follow that code.
"""

from __future__ import annotations

import pytest

from glmtune.data.templates import finish_answer, settled_answer

CASES = [
    ("  你好,我是助手!有什么问题?  ", "你好，我是助手！有什么问题？"),
    ("Hello, world! a:b", "Hello, world! a:b"),          # no Chinese neighbour: unchanged
    ("数据:[[训练时间]],来源;网络", "数据：2023年，来源；网络"),
    ("中,,文", "中，，文"),
    ("x ,中", "x ，中"),
]


@pytest.mark.parametrize("raw,expected", CASES)
def test_chatglm1_answer_equals_thudms_process_response(raw, expected):
    assert finish_answer("chatglm1", raw) == expected


def test_other_families_only_strip_and_fill_the_placeholder():
    assert finish_answer("chatglm2", " 截至[[训练时间]],你好 ") == "截至2023年,你好"
    assert finish_answer("glm4", " [[训练时间]] ") == "[[训练时间]]"


@pytest.mark.parametrize("template", ["chatglm1", "chatglm2", "glm4"])
@pytest.mark.parametrize("raw", [raw for raw, _ in CASES] + ["  ", "a [[训练时", "中, "])
def test_streamed_pieces_never_need_taking_back(template, raw):
    """Every prefix's settled text is a prefix of the final answer, and the last equals it."""
    final = finish_answer(template, raw)
    given = ""
    for end in range(len(raw) + 1):
        settled = settled_answer(template, raw[:end])
        assert final.startswith(settled), (raw[:end], settled, final)
        assert settled.startswith(given) or len(settled) < len(given)
        given = max(given, settled, key=len)
    assert final.startswith(given)
