"""Prompt formats of the ChatGLM family, with the loss mask built in.

A conversation is rendered into :class:`Segment` s: plain text, or one special
token given by name. Each segment is tokenized on its own, so a segment that
is trained (``train=True``) maps to exactly its own tokens in ``labels`` and
nothing leaks across the prompt/answer boundary. Rendering the same messages
with ``add_generation_prompt=True`` yields the inference prompt, whose ids are
a prefix of the training ids of the same conversation.

Every format reproduces what the family's official code feeds the model:

- ``chatglm1``: ChatGLM-6B ``chat()`` / ptuning ``main.py``: the prompt text,
  then ``[gMASK]`` ``<sop>`` after it, the answer, ``<eop>``.
- ``chatglm2``: ChatGLM2-6B ``build_prompt`` with the ``[gMASK]`` ``sop`` prefix.
- ``chatglm3``: ChatGLM3-6B ``build_chat_input`` / ``build_single_message``.
- ``glm4``: GLM-4 chat template (also what tiny-glm's chat template renders).
- ``glm45``: GLM-4.5's chat template (GLM-4.5/4.6/4.7, GLM-4.7-Flash): every assistant
  turn opens with a ``<think>`` block, which holds the reasoning only in the turns after
  the last user message (as the template drops it from history).
- ``chat_template``: the tokenizer's own Jinja chat template.
- ``plain``: a neutral text format for base models without a chat template.

Trained tokens: the assistant text and the end-of-turn token after the last
assistant turn. ``chatglm3``, ``glm4`` and ``glm45`` also train the role token that
follows each earlier assistant turn (``<|user|>``), as their official
fine-tuning scripts do (their loss mask is shifted by one): those models end a
turn by emitting it, and it is one of their stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from glmtune.config import TEMPLATES  # the names; the builders below follow them
from glmtune.data.sample import ROLES, Message, Sample
from glmtune.errors import GlmtuneError
from glmtune.tokens import token_id

IGNORE_INDEX = -100

# What render() writes for the end-of-turn token when it is given no tokenizer;
# with a tokenizer the tokenizer's own end token is used (see end_token()).
_DEFAULT_END = {"chatglm1": "<eop>", "chatglm2": "</s>", "chatglm3": "</s>",
                "glm4": "<|endoftext|>", "glm45": "<|endoftext|>", "chat_template": "</s>", "plain": "</s>"}


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool = False  # text is the name of ONE special token, never tokenized as text
    train: bool = False


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise GlmtuneError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")
    return template


# --- special tokens -------------------------------------------------------

def resolve_special(tokenizer, name: str, template: str | None = None) -> int:
    tid = token_id(tokenizer, name)
    if tid is None:
        needed = f" that template {template!r} needs" if template else ""
        raise GlmtuneError(
            f"the tokenizer has no special token {name!r}{needed}; this model probably uses "
            f"another prompt format: pick one with --template ({', '.join(TEMPLATES)})")
    return tid


def end_token(template: str, tokenizer) -> str:
    """Name of the token that ends a trained assistant turn."""
    if template == "chatglm1" and token_id(tokenizer, "<eop>") is not None:
        return "<eop>"
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise GlmtuneError(f"the tokenizer has no eos_token, which template {template!r} needs "
                           "to end a trained answer; set eos_token in tokenizer_config.json")
    return eos


# --- rendering -----------------------------------------------------------

def _check_messages(messages: Sequence[Message], add_generation_prompt: bool) -> None:
    """Optional leading system message, then user/assistant turns strictly alternating."""
    if not messages:
        raise GlmtuneError("cannot render an empty conversation")
    expected = "user"
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise GlmtuneError(f"message {i}: unknown role {message.role!r} (expected one of {ROLES})")
        if message.role == "system" and i == 0:
            continue
        if message.role != expected:
            raise GlmtuneError(f"message {i}: role {message.role!r} out of order (expected "
                               f"{expected!r}: an optional system message first, then user and "
                               "assistant turns alternating)")
        expected = "assistant" if expected == "user" else "user"
    last = "user" if add_generation_prompt else "assistant"
    if messages[-1].role != last:
        purpose = "an inference prompt" if add_generation_prompt else "a training example"
        raise GlmtuneError(f"{purpose} must end with a {last} message, not {messages[-1].role!r}")


def _pairs(messages: Sequence[Message]) -> tuple[str, list[list]]:
    """(system, [[user, assistant-or-None], ...]) of checked messages."""
    system = messages[0].content if messages[0].role == "system" else ""
    turns = [m for m in messages if m.role != "system"]
    pairs = [[turns[i].content, turns[i + 1].content if i + 1 < len(turns) else None]
             for i in range(0, len(turns), 2)]
    return system, pairs


def _rounds(messages: Sequence[Message]) -> tuple[list[list], str, str | None]:
    """(earlier [question, answer] pairs, last question, its answer or None) for the
    ChatGLM-6B / ChatGLM2 round formats, which have no system role: a system message
    goes before the first question."""
    system, pairs = _pairs(messages)
    if system:
        pairs[0][0] = f"{system}\n{pairs[0][0]}"
    *history, (query, answer) = pairs
    return history, query, answer


def _chatglm1(messages, gen: bool, end: str) -> list[Segment]:
    history, query, answer = _rounds(messages)
    if not history:
        prompt = query
    else:
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        prompt += f"[Round {len(history)}]\n问：{query}\n答："
    # v1's tokenizer appends [gMASK] <sop> AFTER the prompt, not before it.
    segments = [Segment(prompt), Segment("[gMASK]", special=True), Segment("<sop>", special=True)]
    if not gen:
        segments += [Segment(answer, train=True), Segment(end, special=True, train=True)]
    return segments


def _chatglm2(messages, gen: bool, end: str) -> list[Segment]:
    history, query, answer = _rounds(messages)
    prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1))
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    segments = [Segment("[gMASK]", special=True), Segment("sop", special=True), Segment(prompt)]
    if not gen:
        segments += [Segment(answer, train=True), Segment(end, special=True, train=True)]
    return segments


def _role_tagged(messages, gen: bool, end: str, *, prefix: tuple[str, str],
                 newline_trained: bool, newline_in_prompt: bool) -> list[Segment]:
    """ChatGLM3 / GLM-4: ``<|role|>`` special, then "\\n" + content for every message."""
    segments = [Segment(prefix[0], special=True), Segment(prefix[1], special=True)]
    after_assistant = False
    for message in messages:
        assistant = message.role == "assistant"
        # The official scripts train the token right after an assistant turn: the next role token.
        segments.append(Segment(f"<|{message.role}|>", special=True, train=after_assistant))
        if assistant:
            segments += [Segment("\n", train=newline_trained),
                         Segment(message.content, train=True)]
        elif newline_in_prompt:
            segments.append(Segment("\n" + message.content))
        else:
            # build_single_message encodes the "\n" and the content separately.
            segments += [Segment("\n"), Segment(message.content)]
        after_assistant = assistant
    if gen:
        segments.append(Segment("<|assistant|>", special=True))
        if newline_in_prompt:
            segments.append(Segment("\n"))
    else:
        segments.append(Segment(end, special=True, train=True))
    return segments


def split_thinking(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, split as GLM-4.5's chat template does:
    the reasoning is what precedes the first ``</think>`` (after any ``<think>``), the
    answer what follows the last one."""
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")
    return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")


def strip_thinking(answer: str) -> str:
    """A generated answer without its leading ``<think>...</think>`` block.

    An answer whose thinking never closed (max_new_tokens reached) is returned whole:
    the reasoning is all the model produced.
    """
    text = answer.strip()
    if text.startswith("<think>") and "</think>" in text:
        return text.split("</think>", 1)[1].strip()
    return text


def _glm45(messages, gen: bool, end: str) -> list[Segment]:
    """GLM-4.5's chat template (zai-org/GLM-4.5 ... GLM-4.7 tokenizer_config.json).

    Each assistant turn is ``<|assistant|>`` + ``\n<think>R</think>`` + ``\n`` answer: R is
    the reasoning given in the data (``<think>R</think>answer``) for turns after the last
    user message, empty for earlier ones. The generation prompt ends at ``<|assistant|>``:
    the model writes its ``<think>`` block itself.
    """
    segments = [Segment("[gMASK]", special=True), Segment("<sop>", special=True)]
    last_user = max(i for i, m in enumerate(messages) if m.role == "user")
    after_assistant = False
    for i, message in enumerate(messages):
        segments.append(Segment(f"<|{message.role}|>", special=True, train=after_assistant))
        if message.role == "assistant":
            reasoning, answer = split_thinking(message.content)
            think = reasoning.strip() if i > last_user else ""
            text = f"\n<think>{think}</think>" + (f"\n{answer.strip()}" if answer.strip() else "")
            segments.append(Segment(text, train=True))
        else:
            segments.append(Segment("\n" + message.content))
        after_assistant = message.role == "assistant"
    segments.append(Segment("<|assistant|>", special=True) if gen
                    else Segment(end, special=True, train=True))
    return segments


def _plain(messages, gen: bool, end: str, bos: str | None) -> list[Segment]:
    system, pairs = _pairs(messages)
    segments = [Segment(bos, special=True)] if bos else []
    if system:
        segments.append(Segment(f"{system}\n\n"))
    for i, (user, assistant) in enumerate(pairs):
        segments.append(Segment(f"{user}\n"))
        if assistant is not None:
            segments.append(Segment(assistant, train=True))
            last = i == len(pairs) - 1
            segments.append(Segment(end, special=True, train=True) if last else Segment("\n\n"))
    return segments


def _apply_chat_template(tokenizer, messages, add_generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # Jinja errors, raise_exception() in templates, missing template
        raise GlmtuneError(f"the tokenizer's chat template failed: {exc}; pick another format "
                           f"with --template ({', '.join(TEMPLATES)})") from exc
    if not isinstance(text, str):
        raise GlmtuneError("the tokenizer's chat template did not render to text")
    return text


def _chat_template(messages, gen: bool, tokenizer) -> list[Segment]:
    """Segments from the tokenizer's chat template, trained spans found by incremental rendering.

    For each assistant turn i, the text between render(messages[:i], generation prompt)
    and render(messages[:i+1]) is what the model must produce, so it is trained. That only
    works when each render is a prefix of the next; templates that rewrite history (drop
    earlier reasoning, number turns from the end, ...) break it, and then only the last
    assistant turn is trained: the full render minus the generation prompt of everything
    before it (from where they first differ, if the prompt is not even a prefix).

    If the trained text of the last turn holds no special token, the template has no
    end-of-turn marker of its own, so the tokenizer's eos is appended and trained: without
    it a fine-tuned model would never learn to stop.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise GlmtuneError("template 'chat_template' needs a tokenizer with a chat template; "
                           f"this one has none: pick another with --template ({', '.join(TEMPLATES)})")
    pieces: list[Segment] = []
    done = ""
    incremental = True
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _apply_chat_template(tokenizer, messages[:i], True)
        full = _apply_chat_template(tokenizer, messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            incremental = False
            break
        pieces += [Segment(prompt[len(done):]), Segment(full[len(prompt):], train=True)]
        done = full
    if gen:
        prompt = _apply_chat_template(tokenizer, messages, True)
        if incremental and prompt.startswith(done):
            return [p for p in pieces + [Segment(prompt[len(done):])] if p.text]
        return [Segment(prompt)]
    if not incremental:
        prompt = _apply_chat_template(tokenizer, messages[:-1], True)
        full = _apply_chat_template(tokenizer, messages, False)
        cut = len(prompt) if full.startswith(prompt) else _common_prefix(prompt, full)
        pieces = [Segment(full[:cut]), Segment(full[cut:], train=True)]
    pieces = [p for p in pieces if p.text]
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
    last_trained = pieces[-1].text if pieces and pieces[-1].train else ""
    if not any(token in last_trained for token in specials):
        pieces.append(Segment(end_token("chat_template", tokenizer), special=True, train=True))
    return pieces


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
           tokenizer=None) -> list[Segment]:
    """Segments of a conversation in ``template``'s format.

    ``add_generation_prompt=True``: messages end with a user turn; the result is the prompt
    up to where the model starts its answer. Otherwise messages end with an assistant turn
    and the result is a training example. ``tokenizer`` is needed for ``chat_template``;
    given, it also supplies the end-of-turn token and (``plain``) the bos token.
    """
    check_template(template)
    messages = tuple(messages)
    _check_messages(messages, add_generation_prompt)
    gen = add_generation_prompt
    if template == "chat_template":
        if tokenizer is None:
            raise GlmtuneError("template 'chat_template' needs the tokenizer to render")
        return _chat_template(messages, gen, tokenizer)
    end = end_token(template, tokenizer) if tokenizer is not None else _DEFAULT_END[template]
    if template == "chatglm1":
        return _chatglm1(messages, gen, end)
    if template == "chatglm2":
        return _chatglm2(messages, gen, end)
    if template == "chatglm3":
        return _role_tagged(messages, gen, end, prefix=("[gMASK]", "sop"),
                            newline_trained=True, newline_in_prompt=False)
    if template == "glm4":
        return _role_tagged(messages, gen, end, prefix=("[gMASK]", "<sop>"),
                            newline_trained=False, newline_in_prompt=True)
    if template == "glm45":
        return _glm45(messages, gen, end)
    bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
    return _plain(messages, gen, end, bos)


def render_string(template: str, messages: Sequence[Message], *,
                  add_generation_prompt: bool = False, tokenizer=None) -> str:
    segments = render(template, messages, add_generation_prompt=add_generation_prompt,
                      tokenizer=tokenizer)
    return "".join(segment.text for segment in segments)


# --- token ids -----------------------------------------------------------

def encode_segments(segments: Sequence[Segment], tokenizer,
                    template: str | None = None) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        if segment.special:
            ids = [resolve_special(tokenizer, segment.text, template)]
        elif segment.text:
            ids = list(tokenizer.encode(segment.text, add_special_tokens=False))
        else:
            continue
        input_ids += ids
        labels += ids if segment.train else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode(template: str, sample: Sample, tokenizer, max_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one training sample; labels are -100 where not trained.

    Longer samples keep their first ``max_len`` tokens and report truncated=True.
    """
    check_template(template)
    if max_len < 1:
        raise GlmtuneError(f"max_len must be at least 1, not {max_len}")
    if sample.is_plain:
        segments = []
        if template == "plain" and getattr(tokenizer, "bos_token", None):
            # Nothing predicts the first token, so bos carries no label either way.
            segments.append(Segment(tokenizer.bos_token, special=True))
        segments += [Segment(sample.text, train=True),
                     Segment(end_token(template, tokenizer), special=True, train=True)]
    else:
        segments = render(template, sample.messages, tokenizer=tokenizer)
    input_ids, labels = encode_segments(segments, tokenizer, template)
    truncated = len(input_ids) > max_len
    return input_ids[:max_len], labels[:max_len], truncated


def encode_prompt(template: str, messages: Sequence[Message], tokenizer) -> list[int]:
    """Ids of the inference prompt: the model's answer starts right after them."""
    segments = render(template, messages, add_generation_prompt=True, tokenizer=tokenizer)
    return encode_segments(segments, tokenizer, template)[0]


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """Ids that end an assistant turn: generation stops at any of them."""
    check_template(template)
    names = [end_token(template, tokenizer)]
    if getattr(tokenizer, "eos_token", None):
        names.append(tokenizer.eos_token)
    if template in ("chatglm3", "glm4", "glm45"):
        # These models end a turn by starting the next one.
        names += ["<|user|>", "<|observation|>"]
    ids = [resolve_special(tokenizer, names[0], template)]
    for name in names[1:]:
        tid = token_id(tokenizer, name)
        if tid is not None and tid not in ids:
            ids.append(tid)
    if template == "chat_template":
        # The template's own end-of-turn marker (<|im_end|>, <|eot_id|>, ...): the special
        # tokens of a probe answer's trained span.
        probe = [Message("user", "hi"), Message("assistant", "hello")]
        input_ids, labels = encode_segments(render(template, probe, tokenizer=tokenizer), tokenizer)
        special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        for tid, label in zip(input_ids, labels):
            if label != IGNORE_INDEX and tid in special_ids and tid not in ids:
                ids.append(tid)
    return ids


# --- answers -------------------------------------------------------------

# THUDM's models were trained to write this placeholder; their chat() fills it in.
_TRAINING_TIME = ("[[训练时间]]", "2023年")
# ChatGLM-6B's tokenizer normalizes full-width punctuation to ASCII (NFKC), so the model
# writes ASCII; its chat() turns it back into full width next to a Chinese character.
_V1_PUNCTUATION = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "[\u4e00-\u9fff]"


def finish_answer(template: str, text: str) -> str:
    """A decoded answer as the family's own ``chat()`` returns it (all: stripped)."""
    import re

    text = text.strip()
    if template in ("chatglm1", "chatglm2", "chatglm3"):
        text = text.replace(*_TRAINING_TIME)
    if template == "chatglm1":
        for half, full in _V1_PUNCTUATION.items():
            text = re.sub(f"({_CJK}){re.escape(half)}", rf"\g<1>{full}", text)
            text = re.sub(f"{re.escape(half)}({_CJK})", rf"{full}\g<1>", text)
    return text


def settled_answer(template: str, text: str) -> str:
    """The part of ``finish_answer(template, text + more)`` that no ``more`` can change,
    for streaming: the end of ``text`` is held back while it is whitespace (the final
    strip), punctuation (its full-width form depends on the next character) or the
    start of the training-time placeholder."""
    placeholder = _TRAINING_TIME[0]
    cut, previous = len(text), None
    while cut != previous:
        previous = cut
        while cut and (text[cut - 1].isspace() or text[cut - 1] in _V1_PUNCTUATION):
            cut -= 1
        cut -= next((n for n in range(len(placeholder) - 1, 0, -1)
                     if text[:cut].endswith(placeholder[:n])), 0)
    return finish_answer(template, text[:cut])
