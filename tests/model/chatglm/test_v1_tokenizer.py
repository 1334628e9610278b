"""ChatGLM-6B's tokenizer without remote code gives the ids and text of THUDM's own.

Golden values (v1_golden.json): THUDM's tokenization_chatglm.py under transformers
4.33.3 on the tiny checkpoint of tests/fixtures/chatglm_layout.py; how they were
made is in make_v1_golden.py beside this file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError
from glmtune.model.chatglm.v1_tokenizer import ChatGLM1Tokenizer
from tests.fixtures.chatglm_layout import build_chatglm

GOLDEN = json.loads((Path(__file__).with_name("v1_golden.json")).read_text("utf-8"))
# ice_text.model the golden values were computed on; a different hash means a
# sentencepiece release trains differently, and the golden values must be remade.
ICE_TEXT_SHA256 = "acfce4e3b7ada13e6b98365607fb6cd617302f6b22ac9d3e5de63b5af02cf4df"


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> Path:
    return build_chatglm(tmp_path_factory.mktemp("chatglm1") / "chatglm-6b", 1)


@pytest.fixture(scope="module")
def tok(v1_dir) -> ChatGLM1Tokenizer:
    return ChatGLM1Tokenizer.from_dir(v1_dir)


def test_fixture_is_the_golden_one(v1_dir):
    digest = hashlib.sha256((v1_dir / "ice_text.model").read_bytes()).hexdigest()
    assert digest == ICE_TEXT_SHA256, "ice_text.model changed: regenerate v1_golden.json"


def test_vocabulary_layout_and_special_ids(tok, v1_dir):
    config = json.loads((v1_dir / "config.json").read_text())
    assert [tok.convert_ids_to_tokens(i) for i in range(6)] == [
        "<unk>", "<s>", "</s>", "<pad>", "<n>", "\u2581"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id,
            tok.gmask_token_id) == (config["bos_token_id"], config["eos_token_id"],
                                    config["pad_token_id"], config["mask_token_id"],
                                    config["gmask_token_id"])
    assert len(tok) == tok.vocab_size == config["vocab_size"]
    assert tok.padding_side == "left"


@pytest.mark.parametrize("index", range(len(GOLDEN["texts"])))
def test_ids_tokens_and_text_equal_thudms(tok, index):
    text = GOLDEN["texts"][index]
    ids = tok(text)["input_ids"]
    assert ids == GOLDEN["ids"][index]
    assert tok.encode(text, add_special_tokens=False) == GOLDEN["ids_plain"][index]
    assert tok.tokenize(text) == GOLDEN["tokens"][index]
    assert tok.decode(ids) == GOLDEN["decoded"][index]
    assert tok.decode(ids, skip_special_tokens=True) == GOLDEN["decoded_skip"][index]


def test_whitespace_tokens_are_used_and_inverted(tok):
    text = "def f():\n\treturn  1" + " " * 85 + "x"
    tokens = tok.tokenize(text)
    assert {"<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<|blank_5|>"} <= set(tokens)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_pair_appends_answer_and_eop(tok):
    assert tok("问题", "回答")["input_ids"] == GOLDEN["pair"]
    assert GOLDEN["pair"][-1] == tok.eos_token_id


def test_image_token_offset(tmp_path):
    """The first release of chatglm-6b put 20000 image tokens before the text pieces."""
    tok = ChatGLM1Tokenizer.from_dir(build_chatglm(tmp_path / "old", 1, num_image_tokens=20000))
    assert [tok(t)["input_ids"] for t in GOLDEN["texts"]] == GOLDEN["ids_offset"]
    assert [tok.decode(ids) for ids in GOLDEN["ids_offset"]] == GOLDEN["decoded_offset"]
    assert tok.convert_ids_to_tokens(7) == "<image_7>" and tok.convert_tokens_to_ids("<image_7>") == 7


def test_padding_under_transformers_5(tok):
    batch = tok(["你好", "Hello world"], padding=True)
    short = tok("你好")["input_ids"]
    width = len(batch["input_ids"][1])
    assert batch["input_ids"][0] == [tok.pad_token_id] * (width - len(short)) + short
    assert batch["attention_mask"][0] == [0] * (width - len(short)) + [1] * len(short)
    right = tok(["你好", "Hello world"], padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"][0].tolist()[:len(short)] == short
    padded = tok.pad({"input_ids": [short]}, padding="max_length", max_length=len(short) + 3)
    assert padded["input_ids"][0][:3] == [tok.pad_token_id] * 3


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").is_file()
    again = ChatGLM1Tokenizer.from_pretrained(tmp_path)
    assert [again(t)["input_ids"] for t in GOLDEN["texts"]] == GOLDEN["ids"]


def test_missing_vocabulary_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(GlmtuneError, match="ice_text.model"):
        ChatGLM1Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_config_names_the_file(v1_dir, tmp_path):
    (tmp_path / "ice_text.model").write_bytes((v1_dir / "ice_text.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(GlmtuneError, match="tokenizer_config.json"):
        ChatGLM1Tokenizer.from_dir(tmp_path)
