import pytest

from glmtune.data.sample import Message, Sample
from glmtune.data.templates import (
    TEMPLATES,
    encode,
    encode_prompt,
    render,
    render_string,
    resolve_special,
    stop_token_ids,
)
from glmtune.errors import GlmtuneError

U, A, S = "user", "assistant", "system"
ONE = (Message(U, "你好"), Message(A, "您好！"))
MULTI = (Message(S, "Be brief."), Message(U, "Q1"), Message(A, "A1"),
         Message(U, "Q2"), Message(A, "A2"))

GLM_SPECIALS = ["[gMASK]", "[MASK]", "sop", "eop", "<sop>", "<eop>", "<|endoftext|>",
                "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|end|>"]


def byte_tokenizer(eos="<|endoftext|>", bos=None, chat_template=None):
    """A byte-level BPE with no merges: one token per UTF-8 byte, so positions are countable by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<pad>", "</s>", "<s>"] + GLM_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    extra = [t for t in specials if t not in ("<unk>", "<pad>", eos, bos)]
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=bos,
                                  unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=extra)
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids_of(tok, *parts):
    """Expected ids: '<...>' / '[...]' / 'sop' parts are one special token, the rest bytes."""
    ids = []
    for part in parts:
        if part in GLM_SPECIALS or part in ("</s>", "<s>"):
            ids.append(tok.convert_tokens_to_ids(part))
        else:
            ids += tok.encode(part, add_special_tokens=False)
    return ids


# --- golden strings -------------------------------------------------------

GOLDEN = {
    "chatglm1": (
        "你好[gMASK]<sop>您好！<eop>",
        "[Round 0]\n问：Be brief.\nQ1\n答：A1\n[Round 1]\n问：Q2\n答：[gMASK]<sop>A2<eop>",
        "[Round 0]\n问：Be brief.\nQ1\n答：A1\n[Round 1]\n问：Q2\n答：[gMASK]<sop>",
    ),
    "chatglm2": (
        "[gMASK]sop[Round 1]\n\n问：你好\n\n答：您好！</s>",
        "[gMASK]sop[Round 1]\n\n问：Be brief.\nQ1\n\n答：A1\n\n[Round 2]\n\n问：Q2\n\n答：A2</s>",
        "[gMASK]sop[Round 1]\n\n问：Be brief.\nQ1\n\n答：A1\n\n[Round 2]\n\n问：Q2\n\n答：",
    ),
    "chatglm3": (
        "[gMASK]sop<|user|>\n你好<|assistant|>\n您好！</s>",
        "[gMASK]sop<|system|>\nBe brief.<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\nA2</s>",
        "[gMASK]sop<|system|>\nBe brief.<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>",
    ),
    "glm4": (
        "[gMASK]<sop><|user|>\n你好<|assistant|>\n您好！<|endoftext|>",
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2"
        "<|assistant|>\nA2<|endoftext|>",
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\n",
    ),
    "plain": (
        "你好\n您好！</s>",
        "Be brief.\n\nQ1\nA1\n\nQ2\nA2</s>",
        "Be brief.\n\nQ1\nA1\n\nQ2\n",
    ),
}


@pytest.mark.parametrize("template", sorted(GOLDEN))
def test_golden_strings(template):
    single, multi, generation = GOLDEN[template]
    assert render_string(template, ONE) == single
    assert render_string(template, MULTI) == multi
    assert render_string(template, MULTI[:-1], add_generation_prompt=True) == generation


def test_chatglm1_single_turn_prompt_is_the_raw_query():
    # ChatGLM-6B's chat() adds no round header when there is no history.
    assert render_string("chatglm1", ONE[:1], add_generation_prompt=True) == "你好[gMASK]<sop>"
    with_system = (Message(S, "Sys"),) + ONE[:1]
    assert render_string("chatglm1", with_system, add_generation_prompt=True) == "Sys\n你好[gMASK]<sop>"


def test_tokenizer_supplies_end_token(tok):
    # ChatGLM2-style template on a tokenizer whose eos is <|endoftext|>: the tokenizer wins.
    assert render_string("chatglm2", ONE, tokenizer=tok).endswith("您好！<|endoftext|>")
    plain_bos = byte_tokenizer(eos="</s>", bos="<s>")
    assert render_string("plain", ONE, tokenizer=plain_bos) == "<s>你好\n您好！</s>"


def test_specials_are_segments_not_text():
    segments = render("glm4", ONE)
    assert [s.text for s in segments if s.special] == [
        "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"]


# --- token-level masking ----------------------------------------------------

def test_glm4_labels_token_by_token(tok):
    ids, labels, truncated = encode("glm4", Sample(messages=(Message(U, "hi"), Message(A, "ok"))), tok, 64)
    expected = ids_of(tok, "[gMASK]", "<sop>", "<|user|>", "\nhi", "<|assistant|>", "\n", "ok",
                      "<|endoftext|>")
    assert ids == expected
    # 8 prompt tokens ([gMASK] <sop> <|user|> \n h i <|assistant|> \n), then o k eos trained.
    assert labels == [-100] * 8 + expected[8:]
    assert not truncated


def test_glm4_multi_turn_trains_every_answer_and_the_turn_end(tok):
    sample = Sample(messages=(Message(U, "a"), Message(A, "b"), Message(U, "c"), Message(A, "d")))
    ids, labels, _ = encode("glm4", sample, tok, 64)
    user, eos = tok.convert_tokens_to_ids("<|user|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    b, d = tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("d")
    # [gMASK] <sop> <|user|> \n a <|assistant|> \n b <|user|> \n c <|assistant|> \n d eos
    assert labels == [-100] * 7 + [b, user] + [-100] * 4 + [d, eos]
    assert len(ids) == len(labels) == 15


def test_chatglm3_trains_the_newline_after_the_role_token(tok):
    ids, labels, _ = encode("chatglm3", Sample(messages=(Message(U, "hi"), Message(A, "ok"))), tok, 64)
    assert ids == ids_of(tok, "[gMASK]", "sop", "<|user|>", "\n", "hi", "<|assistant|>", "\n", "ok",
                         "<|endoftext|>")
    assert labels == [-100] * 7 + ids[7:]


def test_chatglm1_trains_only_the_last_answer(tok):
    tok1 = byte_tokenizer(eos="<eop>", bos="<sop>")
    sample = Sample(messages=(Message(U, "a"), Message(A, "b"), Message(U, "c"), Message(A, "d")))
    ids, labels, _ = encode("chatglm1", sample, tok1, 256)
    prompt = "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答："
    n = len(tok1.encode(prompt, add_special_tokens=False)) + 2  # + [gMASK] <sop>
    assert ids[n - 2:] == ids_of(tok1, "[gMASK]", "<sop>", "d", "<eop>")
    assert labels == [-100] * n + ids[n:]


def test_plain_template_adds_bos_and_masks_prompts():
    tok = byte_tokenizer(eos="</s>", bos="<s>")
    ids, labels, _ = encode("plain", Sample(messages=(Message(U, "q"), Message(A, "a"))), tok, 64)
    assert ids == ids_of(tok, "<s>", "q\n", "a", "</s>")
    assert labels == [-100, -100, -100] + ids[3:]


def test_plain_text_sample_is_fully_trained(tok):
    ids, labels, _ = encode("glm4", Sample(text="abc"), tok, 64)
    assert ids == ids_of(tok, "abc", "<|endoftext|>") and labels == ids
    bos_tok = byte_tokenizer(eos="</s>", bos="<s>")
    ids, labels, _ = encode("plain", Sample(text="abc"), bos_tok, 64)
    assert ids == ids_of(bos_tok, "<s>", "abc", "</s>")
    assert labels == [-100] + ids[1:]


def test_truncation_keeps_the_head_and_reports_it(tok):
    sample = Sample(messages=(Message(U, "hi"), Message(A, "ok")))
    full, full_labels, truncated = encode("glm4", sample, tok, 11)
    assert len(full) == 11 and not truncated
    ids, labels, truncated = encode("glm4", sample, tok, 9)
    assert truncated and ids == full[:9] and labels == full_labels[:9]


@pytest.mark.parametrize("template", ["chatglm1", "chatglm2", "chatglm3", "glm4", "glm45", "plain"])
def test_inference_prompt_is_a_prefix_of_training_ids(tok, template):
    # Otherwise the model is prompted with tokens it never saw while learning to answer.
    ids, _, _ = encode(template, Sample(messages=MULTI), tok, 512)
    prompt = encode_prompt(template, MULTI[:-1], tok)
    assert ids[:len(prompt)] == prompt
    ids, labels, _ = encode(template, Sample(messages=ONE), tok, 512)
    prompt = encode_prompt(template, ONE[:-1], tok)
    assert ids[:len(prompt)] == prompt
    # The answer's first token is trained exactly where the prompt ends.
    assert set(labels[:len(prompt)]) == {-100} and labels[len(prompt)] != -100


# --- chat_template ----------------------------------------------------------

ROLE_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def trained_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != -100])


def test_chat_template_trains_each_assistant_turn():
    tok = byte_tokenizer(chat_template=ROLE_TEMPLATE)
    sample = Sample(messages=MULTI)
    ids, labels, _ = encode("chat_template", sample, tok, 512)
    text = render_string("chat_template", MULTI, tokenizer=tok)
    assert text == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in MULTI], tokenize=False)
    # The template's own <|end|> closes each answer, so no eos is appended.
    assert trained_text(tok, ids, labels) == "A1<|end|>A2<|end|>"
    end = tok.convert_tokens_to_ids("<|end|>")
    assert set(stop_token_ids("chat_template", tok)) == {tok.eos_token_id, end}
    prompt = encode_prompt("chat_template", MULTI[:-1], tok)
    assert ids[:len(prompt)] == prompt


def test_chat_template_without_end_marker_gets_eos():
    tok = byte_tokenizer(chat_template=(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"))
    ids, labels, _ = encode("chat_template", Sample(messages=ONE), tok, 512)
    assert trained_text(tok, ids, labels) == "您好！\n<|endoftext|>"


def test_chat_template_that_rewrites_history_trains_last_turn_only():
    # Like templates that drop earlier reasoning: renders are no longer prefixes of each other.
    tok = byte_tokenizer(chat_template=(
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
        "<|assistant|>...<|end|>{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"))
    ids, labels, _ = encode("chat_template", Sample(messages=MULTI), tok, 512)
    assert trained_text(tok, ids, labels) == "A2<|end|>"
    assert "<|assistant|>...<|end|>" in tok.decode(ids)


def test_chat_template_needs_a_template(tok):
    with pytest.raises(GlmtuneError, match="chat template"):
        encode("chat_template", Sample(messages=ONE), tok, 64)


# --- special tokens and errors -----------------------------------------------

def test_missing_special_names_token_and_template():
    tok = byte_tokenizer()
    with pytest.raises(GlmtuneError, match=r"'<\|nope\|>'.*'glm4'"):
        resolve_special(tok, "<|nope|>", "glm4")


def test_resolve_special_falls_back_to_get_command():
    class SentencePieceLike:
        """ChatGLM2/3's tokenizer: unknown names map to unk, specials live behind get_command."""
        unk_token, unk_token_id = "<unk>", 0

        def convert_tokens_to_ids(self, name):
            return 0

        def get_command(self, name):
            return {"[gMASK]": 64790, "sop": 64792}[name]

    assert resolve_special(SentencePieceLike(), "sop") == 64792
    with pytest.raises(GlmtuneError):
        resolve_special(SentencePieceLike(), "<|user|>")


def test_stop_tokens(tok):
    ids = stop_token_ids("glm4", tok)
    assert ids == [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    tok1 = byte_tokenizer(eos="<eop>")
    assert stop_token_ids("chatglm1", tok1) == [tok1.convert_tokens_to_ids("<eop>")]


@pytest.mark.parametrize("messages, generation", [
    ((Message(U, "q"),), False),                      # training sample without an answer
    (ONE, True),                                      # prompt that already holds the answer
    ((Message(A, "a"),), False),                      # answer without a question
    ((Message(U, "q"), Message(S, "s"), Message(A, "a")), False),  # system in the middle
])
def test_malformed_conversations_are_rejected(messages, generation):
    with pytest.raises(GlmtuneError):
        render("glm4", messages, add_generation_prompt=generation)


def test_unknown_template_lists_valid_ones(tok):
    with pytest.raises(GlmtuneError, match="chatglm3"):
        encode("llama", Sample(messages=ONE), tok, 8)
    assert len(TEMPLATES) == 7
