"""The model side of ``glmtune serve``: one base, its adapters, a bounded queue, one worker.

All generation happens in one worker thread, so switching adapters (PEFT ``set_adapter``,
or ``disable_adapter`` for the bare base) can never change the weights under a running
request; the lock makes that hold for anyone else driving the same model too. The worker
takes the oldest waiting job and, when it is greedy, every other waiting greedy job for the
same model (up to ``batch_size``) and generates them together through ``Predictor.run``:
left-padded, each row with its own token limit and stop strings. Sampled jobs (temperature
> 0) run alone, so a seed means the same thing as for one request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.config import PredictConfig, ServeConfig
from glmtune.data.sample import Message
from glmtune.data.templates import encode_prompt, stop_token_ids
from glmtune.errors import GlmtuneError
from glmtune.infer.predict import Answer, Predictor, Sampling, adapter_training_config

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model name of the API: the base with one adapter, or the bare base."""

    name: str
    adapter: str | None  # the adapter directory; None for the bare base
    peft_name: str | None
    template: str
    stop_ids: list[int]


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request. ``on_text`` and ``on_done`` are called from the worker thread."""

    model: ServedModel
    ids: list[int]
    sampling: Sampling
    on_text: Callable[[str], None]
    on_done: Callable[[Answer | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, config: ServeConfig):
        adapters = config.adapters
        problems = []
        for _, path in adapters:  # every bad directory in one error, before loading anything
            try:
                adapter_training_config(path)
            except GlmtuneError as exc:
                problems.append(str(exc))
        if problems:
            raise GlmtuneError("\n".join(problems))
        first = adapters[0][1] if adapters else ""
        self.config = config
        self.predictor = predictor = Predictor(PredictConfig(
            adapter=first, model=config.model, trust_remote_code=config.trust_remote_code,
            template=config.template, max_new_tokens=config.max_new_tokens, quant=config.quant,
            bf16=config.bf16, threads=config.threads))
        tokenizer = predictor.tokenizer
        self.models: dict[str, ServedModel] = {}
        for i, (name, path) in enumerate(adapters):
            peft_name = "default" if i == 0 else f"adapter{i}"
            family = predictor.family if i == 0 else predictor.add_adapter(path, peft_name)
            self._add(ServedModel(name, path, peft_name, family.template,
                                  stop_token_ids(family.template, tokenizer)))
        base = predictor.family_for({})
        self.base_name = _base_name(predictor.source.name, self.models)
        self._add(ServedModel(self.base_name, None, None, base.template,
                              stop_token_ids(base.template, tokenizer)))
        # Batched greedy answers equal one-at-a-time answers in float32 only (Predictor.run)
        self.batch_size = config.batch_size or (1 if predictor.bf16 else 8)
        self.context = _context_length(predictor.model.config)
        self.lock = threading.Lock()
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batch: list[Job] = []
        self.served = self.cancelled = self.rejected = self.largest_batch = 0
        self._seconds_per_job = 1.0  # running estimate, for Retry-After
        self._worker = threading.Thread(target=self._work, name="glmtune-serve", daemon=True)
        self._worker.start()

    def _add(self, model: ServedModel) -> None:
        self.models[model.name] = model

    # ------------------------------------------------------------ requests
    def prompt_ids(self, model: ServedModel, messages: list[Message]) -> list[int]:
        """The chat prompt in the format ``model`` (its adapter) was trained with."""
        return encode_prompt(model.template, messages, self.predictor.tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """A raw completion prompt: the text as is, no chat format."""
        return list(self.predictor.tokenizer.encode(text, add_special_tokens=False))

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when ``queue_size`` jobs already wait."""
        with self._wake:
            if len(self._pending) >= self.config.queue_size:
                self.rejected += 1
                waiting = len(self._pending) / self.batch_size + 1
                raise QueueFull(max(1, round(waiting * self._seconds_per_job)))
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Its client left: a waiting job leaves the queue now, a running one ends at its
        next token."""
        job.cancelled.set()
        with self._wake:
            if job in self._pending:
                self._pending.remove(job)
                self.cancelled += 1

    def health(self) -> dict:
        with self._wake:
            return {"status": "ok", "models": list(self.models), "queued": len(self._pending),
                    "running": len(self._batch), "queue_size": self.config.queue_size,
                    "served": self.served, "cancelled": self.cancelled,
                    "rejected": self.rejected, "batch_size": self.batch_size,
                    "largest_batch": self.largest_batch}

    def close(self) -> None:
        with self._wake:
            self._closing = True
            for job in self._batch:
                job.cancelled.set()
            self._wake.notify()
        self._worker.join(timeout=60)

    # -------------------------------------------------------------- worker
    def _next_batch(self) -> list[Job]:
        """The oldest job, plus waiting greedy jobs for the same model when it is greedy;
        [] when the engine closes."""
        with self._wake:
            batch: list[Job] = []
            while not batch:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return []
                first = self._pending.popleft()
                batch = [first]
                if first.sampling.greedy:
                    for job in list(self._pending):
                        if len(batch) >= self.batch_size:
                            break
                        if job.model is first.model and job.sampling.greedy:
                            self._pending.remove(job)
                            batch.append(job)
                # A client that left while waiting is dropped here, before any work.
                for job in [j for j in batch if j.cancelled.is_set()]:
                    batch.remove(job)
                    self.cancelled += 1
                    job.on_done(Answer("", len(job.ids), 0, "cancelled"))
            self._batch = batch
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def _work(self) -> None:
        while batch := self._next_batch():
            started = time.monotonic()
            try:
                answers = self._generate(batch)
            except Exception as exc:  # handed to each request: the server keeps serving
                log.exception("generation failed")
                answers = [exc] * len(batch)
            with self._wake:
                self._batch = []
                for answer in answers:
                    cancelled = isinstance(answer, Answer) and answer.finish_reason == "cancelled"
                    self.cancelled += cancelled
                    self.served += not cancelled
                spent = (time.monotonic() - started) / len(batch)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * spent
            for job, answer in zip(batch, answers):
                job.on_done(answer)
        # Jobs still waiting when the server stops get an answer too.
        for job in self._pending:
            job.on_done(GlmtuneError("the server is shutting down"))

    def _generate(self, batch: list[Job]) -> list[Answer]:
        model, predictor = batch[0].model, self.predictor
        with self.lock:
            if model.peft_name is not None:
                predictor.model.set_adapter(model.peft_name)
            with predictor.base_model() if model.peft_name is None else nullcontext():
                return predictor.run(
                    [job.ids for job in batch], [job.sampling for job in batch],
                    on_text=lambda row, piece: batch[row].on_text(piece),
                    cancelled=lambda row: batch[row].cancelled.is_set(),
                    stop_ids=model.stop_ids, template=model.template)


def _base_name(source: str, taken: dict) -> str:
    """The bare base's model name: its directory (or hub id) name, unless an adapter has it."""
    name = Path(source.rstrip("/\\")).name or source
    return name if name not in taken else f"{name}-base"


def _context_length(model_config) -> int | None:
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
