"""Generate with a base model plus a trained adapter."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Sequence

from glmtune import hardware
from glmtune.config import PredictConfig, TrainConfig, load_yaml
from glmtune.data.sample import Message
from glmtune.data.templates import encode_prompt, finish_answer, settled_answer, stop_token_ids
from glmtune.errors import GlmtuneError
from glmtune.model import load
from glmtune.model.family import detect_family, template_override
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
    run_config = path / RUN_CONFIG
    return load_yaml(run_config, TrainConfig) if run_config.is_file() else {}


class Predictor:
    """Loads once, answers many prompts. ``generate`` takes a prompt and optional history."""

    def __init__(self, config: PredictConfig):
        import torch

        self.config = config.validate()
        trained = adapter_training_config(config.adapter) if config.adapter else {}
        model_name = config.model or trained.get("model") or _adapter_base(config.adapter)
        trust = config.trust_remote_code or bool(trained.get("trust_remote_code", False))
        hw = hardware.detect()
        hardware.set_threads(config.threads)
        self.bf16 = hw.bf16 if config.bf16 == "auto" else config.bf16 == "true"
        self.device = torch.device(hw.device)

        source = self.source = load.resolve(model_name)
        self.tokenizer = load.load_tokenizer(source, trust)
        family = detect_family(source.config, self.tokenizer, source.path)
        template = config.template if config.template != "auto" else trained.get("template", "auto")
        self.family = family if template == "auto" else template_override(family, template)
        quantized = config.quant != "none"  # bitsandbytes places a quantized model itself
        model = load.load_model(
            source, trust_remote_code=trust,
            quantization_config=load.quantization_config(config.quant, self.bf16),
            device_map={"": hw.device} if quantized else None)
        if config.adapter:
            model = _attach_adapter(model, config.adapter)
        self.model = (model if quantized else model.to(self.device)).eval()
        self.stop_ids = stop_token_ids(self.family.template, self.tokenizer)

    def prompt_ids(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        messages = []
        for question, answer in history:
            messages += [Message("user", question), Message("assistant", answer)]
        messages.append(Message("user", prompt))
        return encode_prompt(self.family.template, messages, self.tokenizer)

    def generate(self, prompt: str, history: Sequence[tuple[str, str]] = (),
                 max_new_tokens: int | None = None) -> str:
        import torch

        ids = torch.tensor([self.prompt_ids(prompt, history)], device=self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens or self.config.max_new_tokens, do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        return self._answer(out[0, ids.shape[1]:])

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

        In float32 each answer equals what ``generate`` gives for that prompt alone: the
        padding is masked and positions count from each prompt's first real token. Under
        bf16 autocast a padded batch rounds differently, so a near-tie can go the other way.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # Similar lengths together waste less compute on padding; answers go back in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, answer in zip(chunk, self._generate_padded([prompts[i] for i in chunk],
                                                             max_new_tokens)):
                answers[i] = answer
            if on_batch is not None:
                on_batch(start + len(chunk), len(prompts))
        return answers

    def _generate_padded(self, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int | None) -> list[str]:
        import torch

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask,
                max_new_tokens=max_new_tokens or self.config.max_new_tokens, do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=pad)
        return [self._answer(row[width:]) for row in out]

    def _answer(self, ids) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return finish_answer(self.family.template, text)

    def stream(self, prompt: str, history: Sequence[tuple[str, str]] = (),
               max_new_tokens: int | None = None) -> Iterator[str]:
        """``generate``'s answer in pieces as they are produced (for chat).

        The pieces joined equal ``generate(prompt, history)``: generation is the same call,
        run in a thread that feeds a streamer, and a piece is given out once what the
        family's answer finishing (``finish_answer``) makes of it can no longer change.
        """
        import threading

        import torch
        from transformers import TextIteratorStreamer

        ids = torch.tensor([self.prompt_ids(prompt, history)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.bf16):
                    self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                        do_sample=False, eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()  # otherwise the consumer waits forever for the end marker

        thread = threading.Thread(target=run, name="glmtune-generate", daemon=True)
        thread.start()
        text, given = "", ""
        for piece in streamer:
            text += piece
            settled = settled_answer(self.family.template, text)
            if len(settled) > len(given) and settled.startswith(given):
                yield settled[len(given):]
                given = settled
        thread.join()
        if failure:
            raise failure[0]
        final = finish_answer(self.family.template, text)
        if final.startswith(given) and len(final) > len(given):
            yield final[len(given):]

    @contextmanager
    def base_model(self):
        """Within the block the adapter is switched off: the bare base model answers."""
        disable = getattr(self.model, "disable_adapter", None)
        with disable() if callable(disable) else nullcontext():
            yield self


def _adapter_base(adapter: str) -> str:
    import json

    try:
        return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GlmtuneError(f"{adapter}: cannot tell which base model the adapter belongs to; "
                           "pass --model") from exc


def _attach_adapter(model, adapter: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
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
        from glmtune.train.artifacts import write_text_atomic

        write_text_atomic(Path(config.out), f"prompt:\n{config.prompt}\n\nanswer:\n{answer}\n")
    return answer
