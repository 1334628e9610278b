"""Generate with a base model plus a trained adapter."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from glmtune.config import PredictConfig, TrainConfig, load_yaml
from glmtune.data.sample import Message
from glmtune.data.templates import (
    encode_prompt,
    finish_answer,
    settled_answer,
    stop_token_ids,
    strip_thinking,
)
from glmtune.errors import GlmtuneError, reading
from glmtune.model import load
from glmtune.model.family import detect_family, template_override
from glmtune.model.lora import check_adapter_config
from glmtune.plan import hardware
from glmtune.train.artifacts import ADAPTER_CONFIG, RUN_CONFIG

log = logging.getLogger(__name__)


def adapter_training_config(adapter: str) -> dict:
    """The settings an adapter was trained with (model, template, remote code)."""
    path = Path(adapter)
    if not path.is_dir():
        raise GlmtuneError(f"{path}: adapter directory not found (train one with `glmtune "
                           "train`, or pass --adapter '' to run the bare base model)")
    if not (path / ADAPTER_CONFIG).is_file():
        raise GlmtuneError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG}); expected "
                           "the output directory of `glmtune train` or any PEFT LoRA adapter")
    check_adapter_config(path)
    run_config = path / RUN_CONFIG
    return load_yaml(run_config, TrainConfig) if run_config.is_file() else {}


class Predictor:
    """Loads once, answers many prompts. ``generate`` takes a prompt and optional history."""

    def __init__(self, config: PredictConfig):
        import torch

        self.config = config.validate()
        trained = adapter_training_config(config.adapter) if config.adapter else {}
        model_name = config.model or trained.get("model") or _adapter_base(config.adapter)
        # An adapter is data: only this command's own flag may let a model's code run.
        trust = config.trust_remote_code
        hw = hardware.detect()
        hardware.set_threads(config.threads)
        self.bf16 = hw.bf16 if config.bf16 == "auto" else config.bf16 == "true"
        self.device = torch.device(hw.device)

        source = self.source = load.resolve(model_name)
        if config.adapter and not config.model:
            log.info("base model: %s (recorded in adapter %s)", model_name, config.adapter)
            load.check_remote_code(source, trust, recorded_in=config.adapter)
        self.tokenizer = load.load_tokenizer(source, trust)
        self.base_family = detect_family(source.config, self.tokenizer, source.path)
        self.family = self.family_for(trained)
        quantized = config.quant != "none"  # bitsandbytes places a quantized model itself
        model = load.load_model(
            source, trust_remote_code=trust,
            quantization_config=load.quantization_config(config.quant, self.bf16),
            device_map={"": hw.device} if quantized else None)
        if config.adapter:
            model = _attach_adapter(model, config.adapter)
        self.model = (model if quantized else model.to(self.device)).eval()
        self.stop_ids = stop_token_ids(self.family.template, self.tokenizer)

    def family_for(self, trained: dict):
        """The family (prompt format) for an adapter trained with settings ``trained``:
        --template, else the one it was trained with, else the base model's own."""
        template = (self.config.template if self.config.template != "auto"
                    else trained.get("template", "auto"))
        return self.base_family if template == "auto" else template_override(self.base_family,
                                                                              template)

    def add_adapter(self, adapter: str, name: str):
        """Load one more adapter onto the same base (serve); returns its family. It becomes
        active with ``self.model.set_adapter(name)``."""
        trained = adapter_training_config(adapter)
        self.model = _attach_adapter(self.model, adapter, name).eval()
        return self.family_for(trained)

    def prompt_ids(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        messages = []
        for question, answer in history:
            messages += [Message("user", question), Message("assistant", answer)]
        messages.append(Message("user", prompt))
        return fit_context(self, messages)

    def generate(self, prompt: str, history: Sequence[tuple[str, str]] = (),
                 max_new_tokens: int | None = None, sampling: Sampling | None = None) -> str:
        sampling = _with_limit(sampling, max_new_tokens)
        return self.run([self.prompt_ids(prompt, history)], [sampling])[0].text

    def conversation_ids(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids of any conversation ending with a user turn (system messages allowed)."""
        return encode_prompt(self.family.template, messages, self.tokenizer)

    def generate_batch(self, prompts: Sequence[str],
                       histories: Sequence[Sequence[tuple[str, str]]] | None = None,
                       max_new_tokens: int | None = None, batch_size: int = 8) -> list[str]:
        """Answers to many prompts, ``batch_size`` at a time; same order as ``prompts``."""
        histories = histories if histories is not None else [()] * len(prompts)
        if len(histories) != len(prompts):
            raise ValueError(f"{len(histories)} histories for {len(prompts)} prompts")
        ids = [self.prompt_ids(p, h) for p, h in zip(prompts, histories)]
        return self.generate_ids(ids, max_new_tokens, batch_size)

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                     batch_size: int = 8,
                     on_batch: Callable[[int, int], None] | None = None) -> list[str]:
        """Greedy answers to already-encoded prompts, left-padded into batches.

        ``on_batch(done, total)`` is called after each batch, for progress reports.
        See ``run`` for when batched answers equal one-at-a-time answers.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # Similar lengths together waste less compute on padding; answers go back in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        sampling = Sampling(max_new_tokens=max_new_tokens)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            done = self.run([prompts[i] for i in chunk], [sampling] * len(chunk))
            for i, answer in zip(chunk, done):
                answers[i] = answer.text
            if on_batch is not None:
                on_batch(start + len(chunk), len(prompts))
        return answers

    def run(self, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
            on_text: Callable[[int, str], None] | None = None,
            cancelled: Callable[[int], bool] | None = None,
            stop_ids: Sequence[int] | None = None,
            template: str | None = None) -> list[Answer]:
        """Answers to encoded prompts generated together, left-padded: the one generation loop
        behind predict, batch predict, eval, chat and serve.

        Each row has its own ``Sampling`` (token limit, stop strings); rows that sample
        (temperature > 0) must share one Sampling. ``on_text(row, piece)`` receives each
        row's answer in pieces as it is produced: the pieces joined are the row's answer.
        ``cancelled(row)`` true ends that row at the next token (its client left).
        ``stop_ids`` and ``template`` replace the family's stop tokens and answer finishing
        (serve: another adapter's prompt format).

        In float32 each greedy answer equals what the prompt alone gives: the padding is
        masked and positions count from each prompt's first real token. Under bf16 autocast
        a padded batch rounds differently, so a near-tie can go the other way.
        """
        import torch
        from transformers import StoppingCriteriaList

        if len(samplings) != len(prompts) or not prompts:
            raise ValueError(f"{len(samplings)} samplings for {len(prompts)} prompts")
        first = samplings[0]
        if not first.greedy and any(s != first for s in samplings):
            raise ValueError("rows that sample must share one Sampling")
        stop_ids = list(stop_ids if stop_ids is not None else self.stop_ids)
        limits = [s.max_new_tokens or self.config.max_new_tokens for s in samplings]
        visible = _Visible(len(prompts), template or self.family.template,
                           self.config.show_thinking, on_text)
        rows = _Rows(self.tokenizer, stop_ids, limits, [s.stop for s in samplings],
                     visible.feed if on_text else None, cancelled)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        options = {"do_sample": False}
        if not first.greedy:
            options = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
        with _seeded(first.seed), torch.no_grad(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(limits),
                eos_token_id=stop_ids, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([rows]), **options)
        answers = [rows.finish(row, len(p)) for row, p in enumerate(prompts)]
        return [visible.finish(row, answer) for row, answer in enumerate(answers)]

    def stream(self, prompt: str, history: Sequence[tuple[str, str]] = (),
               max_new_tokens: int | None = None, sampling: Sampling | None = None,
               ids: Sequence[int] | None = None) -> Iterator[str]:
        """``generate``'s answer in pieces as they are produced (chat, web UI).

        The pieces joined equal ``generate(prompt, history)``: generation is the same
        ``run``, in a thread that hands its pieces over. ``ids`` (from ``conversation_ids``)
        replaces prompt and history. Closing the iterator early stops the generation.
        """
        import queue
        import threading

        sampling = _with_limit(sampling, max_new_tokens)
        ids = list(ids) if ids is not None else self.prompt_ids(prompt, history)
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        end = object()

        def work() -> None:
            try:
                self.run([ids], [sampling], on_text=lambda _, piece: pieces.put(piece),
                         cancelled=lambda _: stop.is_set())
            except BaseException as exc:  # re-raised in the caller's thread below
                pieces.put(exc)
            pieces.put(end)

        thread = threading.Thread(target=work, name="glmtune-generate", daemon=True)
        thread.start()
        try:
            while (piece := pieces.get()) is not end:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            stop.set()
            thread.join()

    @contextmanager
    def base_model(self):
        """Within the block the adapter is switched off: the bare base model answers."""
        disable = getattr(self.model, "disable_adapter", None)
        with disable() if callable(disable) else nullcontext():
            yield self


@dataclass(frozen=True)
class Sampling:
    """How one answer is produced; temperature 0 (the default) is greedy decoding."""

    max_new_tokens: int | None = None  # None: the config's max_new_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling with a seed gives the same answer every time
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or string), "length" (token limit), "cancelled"


def _with_limit(sampling: Sampling | None, max_new_tokens: int | None) -> Sampling:
    sampling = sampling or Sampling()
    return replace(sampling, max_new_tokens=max_new_tokens or sampling.max_new_tokens)


@contextmanager
def _seeded(seed: int | None):
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    yield


class _Visible:
    """What the user sees of each row's answer: without a reasoning model's leading
    ``<think>...</think>`` block (unless --show-thinking), and finished as the family's own
    ``chat()`` finishes it (``finish_answer``). Streamed text is passed on once that view of
    it can no longer change, so the pieces joined equal the final answer."""

    def __init__(self, rows: int, template: str, show_thinking: bool,
                 on_text: Callable[[int, str], None] | None):
        self.template, self.show_thinking, self.on_text = template, show_thinking, on_text
        self.text = [""] * rows
        self.given = [""] * rows

    def _answer_part(self, text: str) -> str | None:
        """``text`` after its reasoning block; None while it may still be inside one."""
        if self.show_thinking:
            return text
        start = text.lstrip()
        if "<think>".startswith(start) or (start.startswith("<think>") and "</think>" not in start):
            return None
        return start.split("</think>", 1)[1] if start.startswith("<think>") else start

    def feed(self, row: int, piece: str) -> None:
        self.text[row] += piece
        part = self._answer_part(self.text[row])
        if part is not None:
            self._give(row, settled_answer(self.template, part))

    def _give(self, row: int, view: str) -> None:
        given = self.given[row]
        if len(view) > len(given) and view.startswith(given):
            self.on_text(row, view[len(given):])
            self.given[row] = view

    def finish(self, row: int, answer: Answer) -> Answer:
        text = answer.text if self.show_thinking else strip_thinking(answer.text)
        final = finish_answer(self.template, text)
        if self.on_text is not None:
            self._give(row, final)  # a reasoning block that never closed is all there is
        return replace(answer, text=final)


class _Rows:
    """Follows each row of a batched ``generate``: its tokens, its text so far, why it ended.

    It is a stopping criterion (called after every step with all tokens so far), so it can
    end one row (stop string, its own token limit, its client gone) while the others go on.
    Text is decoded from all of a row's tokens each time, never token by token: a character
    split over several byte-level tokens only shows once complete (held back while the
    decoded text ends in U+FFFD), and the pieces joined equal the whole answer decoded.
    """

    def __init__(self, tokenizer, stop_ids, limits, stops, on_text, cancelled):
        self.tokenizer, self.stop_ids, self.limits = tokenizer, set(stop_ids), limits
        self.stops = [tuple(s for s in row if s) for row in stops]
        self.on_text, self.cancelled = on_text, cancelled
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.generated = [0] * len(limits)
        self.sent = [""] * len(limits)
        self.reason: list[str | None] = [None] * len(limits)
        self.closed = [False] * len(limits)
        self.final = [""] * len(limits)
        # Decoding every step costs time; only done when someone reads pieces or stops.
        self.follow = on_text is not None or any(self.stops)

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.reason[row] is None:
                self._step(row, token)
        return torch.tensor([r is not None for r in self.reason], device=input_ids.device)

    def _step(self, row: int, token: int) -> None:
        self.generated[row] += 1
        if token in self.stop_ids:
            self.reason[row] = "stop"
        else:
            self.tokens[row].append(token)
            if self.cancelled is not None and self.cancelled(row):
                self.reason[row] = "cancelled"
            elif self.generated[row] >= self.limits[row]:
                self.reason[row] = "length"
        if self.follow:
            self._text(row)

    def _text(self, row: int) -> str:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops[row]) if i >= 0]
        if cuts:
            text, self.reason[row] = text[:min(cuts)], "stop"
        if self.reason[row] is not None:
            text = self.final[row] = text.rstrip()
        else:  # hold back what may still change: whitespace, a partial character or stop
            text = text.rstrip().rstrip("\ufffd")
            held = max((n for s in self.stops[row] for n in range(1, len(s))
                        if text.endswith(s[:n])), default=0)
            text = text[:len(text) - held]
        sent = self.sent[row]
        if (self.on_text is not None and not self.closed[row] and len(text) > len(sent)
                and text.startswith(sent)):
            self.on_text(row, text[len(sent):])
            self.sent[row] = text
        self.closed[row] = self.reason[row] is not None
        return text

    def finish(self, row: int, prompt_tokens: int) -> Answer:
        if self.reason[row] is None:  # generate stopped at the longest row's limit
            self.reason[row] = "length"
        if not self.closed[row]:
            self._text(row)
        return Answer(self.final[row], prompt_tokens, self.generated[row], self.reason[row])


CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions")


def fit_context(predictor: Predictor, messages: list[Message]) -> list[int]:
    """Prompt ids that leave room for the answer in the model's context, or a clear refusal.

    A hostile 100,000-character prompt is never tokenized whole: beyond what the context
    could hold even at MAX_CHARS_PER_TOKEN characters a token it is refused (or cut) first.
    ``--long-prompt truncate`` keeps the prompt's first part, as training keeps a row's.
    """
    from glmtune.data.dataset import MAX_CHARS_PER_TOKEN, cut_to_chars
    from glmtune.data.sample import Sample

    config = predictor.config
    encode = lambda m: encode_prompt(predictor.family.template, m, predictor.tokenizer)
    context = next((predictor.source.config[k] for k in CONTEXT_KEYS
                    if isinstance(predictor.source.config.get(k), int)), None)
    if context is None:
        return encode(messages)
    limit = max(1, context - config.max_new_tokens)
    chars = sum(len(m.content) for m in messages)
    ids = encode(messages) if chars <= limit * MAX_CHARS_PER_TOKEN else None
    if ids is not None and len(ids) <= limit:
        return ids
    size = f"{len(ids)} tokens" if ids is not None else f"{chars} characters"
    if config.long_prompt != "truncate":
        raise GlmtuneError(
            f"prompt: {size} do not fit the model's context of {context} tokens with room for "
            f"--max-new-tokens {config.max_new_tokens}; shorten it, lower --max-new-tokens, or "
            "pass --long-prompt truncate to keep its first part")
    sample, budget = Sample(messages=tuple(messages)), min(chars, limit * MAX_CHARS_PER_TOKEN)
    while budget > 0:
        kept = cut_to_chars(sample, budget) or sample
        ids = encode(list(kept.messages))
        if len(ids) <= limit:
            log.warning("prompt: %s cut to its first %d characters (%d tokens) to fit the "
                        "context of %d tokens", size, budget, len(ids), context)
            return ids
        budget = int(budget * limit / len(ids) * 0.95)
    raise GlmtuneError(f"prompt: the prompt format alone does not fit {limit} tokens; lower "
                       "--max-new-tokens")


def _adapter_base(adapter: str) -> str:
    import json

    try:
        return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GlmtuneError(f"{adapter}: cannot tell which base model the adapter belongs to; "
                           "pass --model") from exc


def _attach_adapter(model, adapter: str, name: str = "default"):
    """``model`` with the adapter in ``adapter`` added under ``name`` (a PeftModel)."""
    from peft import PeftModel

    from glmtune.model.lora import v5_target_names

    weights = next((Path(adapter) / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (Path(adapter) / n).is_file()), Path(adapter))
    try:
        with reading(weights, "LoRA weights: safetensors, or a PyTorch file of tensors only"), \
                v5_target_names(model):
            if isinstance(model, PeftModel):
                model.load_adapter(adapter, adapter_name=name)
                return model
            return PeftModel.from_pretrained(model, adapter, adapter_name=name)
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise GlmtuneError(f"{adapter}: this adapter was trained for a different base model "
                               f"(tensor shapes differ): {str(exc).splitlines()[1].strip()}"
                               ) from exc
        raise
    except (OSError, ValueError) as exc:
        raise GlmtuneError(f"{adapter}: could not load the adapter ({exc})".splitlines()[0]) from exc


def predict(config: PredictConfig) -> str:
    answer = Predictor(config).generate(config.prompt)
    if config.out:
        from glmtune import atomic

        atomic.write_text(Path(config.out), f"prompt:\n{config.prompt}\n\nanswer:\n{answer}\n")
    return answer
