"""The LoRA fine-tuning recipe: setup -> fit -> validate -> save.

Read it top to bottom. ``FineTuner`` keeps the QLoRA seed's three calls
(``setup_model_and_tokenizer``, ``prepare_datasets``, ``train``);
``glmtune.train(config)`` runs them in one go.

We use a plain training loop rather than ``transformers.Trainer``: it is
shorter than the Trainer's configuration, makes the data order and the loss
normalisation explicit (the loss is the mean over every trained token of an
optimizer step, whatever the micro-batch split), and runs bf16 autocast on
CPUs, which measured 1.7x faster than fp32 here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from glmtune import hardware
from glmtune.config import TrainConfig, save_yaml
from glmtune.data import dataset
from glmtune.data.sampler import Sampler
from glmtune.errors import GlmtuneError, writing
from glmtune.hardware import GB
from glmtune.lock import output_lock
from glmtune.model import fused, load, lora, tiny_glm
from glmtune.model.family import Family, detect_family, template_override
from glmtune.plan import Plan, halve_batch, plan_for_model
from glmtune.train import artifacts, checkpoint, distributed, faults, monitor
from glmtune.train.loss import summed_loss
from glmtune.train.monitor import MemoryMonitor

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_losses: list[tuple[int, float]]
    train_loss: float | None
    seconds: float
    interrupted: str | None = None   # the signal (or "request") that stopped the run early
    resume_command: str | None = None


class FineTuner:
    def __init__(self, config: TrainConfig,
                 callbacks: Sequence[Callable[[int, "FineTuner"], None]] = ()):
        """``callbacks`` are called as ``callback(step, tuner)`` after every optimizer step."""
        self.config = config.validate()
        self.callbacks = list(callbacks)
        self._stop_requested: str | None = None
        self.plan: Plan | None = None
        self.source: load.ModelSource | None = None
        self.family: Family | None = None
        self.tokenizer = None
        self.model = None
        self.fused_head = None  # the LM head when it is fused with the loss
        self.train_embeddings = False
        self.dist = distributed.Dist()
        self.strategy = "ddp"  # or fsdp / zero2 / zero3 (distributed.resolve_strategy)
        self.train_set: dataset.TokenizedSet | None = None
        self.val_set: dataset.TokenizedSet | None = None

    # ------------------------------------------------------------------ setup
    def setup_model_and_tokenizer(self) -> None:
        self._ensure_tokenizer()
        import torch

        cfg, plan = self.config, self.plan
        log.info("loading %s", self.source.path)
        quantized = plan.quant != "none"
        model = load.load_model(
            self.source, trust_remote_code=cfg.trust_remote_code, dtype=plan.torch_dtype,
            quantization_config=load.quantization_config(
                plan.quant, plan.bf16, shardable=self.strategy in ("fsdp", "zero3")),
            device_map={"": plan.device} if quantized else None)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if self.train_embeddings:
            log.info("training embeddings and LM head too"
                     + (" (tiny-glm's base is random: LoRA alone cannot learn on it)"
                        if tiny_glm.is_tiny(self.source.path) else ""))
        torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn here: same seed, same start
        self.model = lora.attach_lora(
            model, self.family, r=cfg.lora_r, alpha=cfg.effective_lora_alpha,
            dropout=cfg.lora_dropout, targets=cfg.target_modules,
            train_embeddings=self.train_embeddings, experts=cfg.lora_experts)
        if not quantized:  # bitsandbytes placed a quantized model already
            self.model.to(torch.device(plan.device))
        if cfg.neftune_alpha:
            _add_embedding_noise(self.model, cfg.neftune_alpha)
        use_fused = cfg.fused if cfg.fused is not None else plan.device == "cpu"
        if use_fused and self.strategy == "zero3":
            # ZeRO-3 gathers each weight in its module's forward hook; the kernels read
            # weights across modules, so they would see empty shards
            log.info("fast path off under DeepSpeed ZeRO-3 (reference layers)")
        elif use_fused:
            self.fused_head, parts = fused.install(self.model)
            log.info("fast path: fused %s", ", ".join(parts) or "nothing (reference layers for this model)")

    def _ensure_tokenizer(self) -> None:
        """Locate the model, plan the run and load the tokenizer: cheap, and all data needs."""
        if self.tokenizer is not None:
            return
        cfg = self.config
        self.source = load.resolve(cfg.model)
        load.check_remote_code(self.source, cfg.trust_remote_code)
        hw = hardware.detect()
        self.strategy = distributed.resolve_strategy(cfg.strategy)
        self.dist = distributed.init(hw.device, sharded=self.strategy in distributed.SHARDED)
        problems = distributed.strategy_problems(self.strategy, cfg.quant)
        if problems:
            raise GlmtuneError("; ".join(problems))
        if not self.dist.is_main:  # one copy of the logs is enough
            logging.getLogger("glmtune").setLevel(logging.WARNING)
        log.info("hardware:\n  %s", hardware.describe(hw).replace("\n", "\n  "))
        self.plan, self.config, self.train_embeddings = plan_for_model(
            cfg, hw, self.source, processes=distributed.local_processes())
        hardware.set_threads(self.plan.threads)
        log.info("plan: %s", self.plan.describe())
        self.tokenizer = load.load_tokenizer(self.source, cfg.trust_remote_code)
        family = detect_family(self.source.config, self.tokenizer, self.source.path)
        self.family = family if cfg.template == "auto" else template_override(family, cfg.template)
        log.info("model family: %s, prompt template: %s", self.family.name, self.family.template)

    # ------------------------------------------------------------------- data
    def prepare_datasets(self) -> None:
        self._ensure_tokenizer()  # first: the plan may change max_seq_len to fit memory
        cfg = self.config
        self.train_set, self.val_set = dataset.load_train_val(
            cfg.data, cfg.resolved_val_data, self.tokenizer, self.family.template,
            cfg.max_seq_len, cfg.max_samples, cfg.max_eval_samples, cfg.encoding)

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        cfg = self.config
        out = Path(cfg.output_dir)
        # one writer per output directory (rank 0 holds it for all the run's processes)
        main = distributed.from_environment().is_main
        with output_lock(out, "glmtune train") if main else contextlib.nullcontext():
            _check_output_dir(out, cfg)
            if self.train_set is None:
                self.prepare_datasets()  # data errors surface before the model is loaded
            if main:
                _check_free_space(out, self.plan)
            if self.model is None:
                self.setup_model_and_tokenizer()
            return _Fit(self, out).run()

    def request_stop(self) -> None:
        """Finish the current optimizer step, save a checkpoint and return."""
        self._stop_requested = "request"


def train(config: TrainConfig, callbacks: Sequence[Callable[[int, "FineTuner"], None]] = ()
          ) -> TrainResult:
    """Fine-tune with ``config`` and save the adapter: the one-call API.

    It also leaves the process group it joined (the one-call API owns it).
    """
    try:
        return FineTuner(config, callbacks=callbacks).train()
    finally:
        distributed.shutdown(distributed.from_environment())


def _check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse anything that would overwrite or orphan earlier work without being asked."""
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"{out}: output_dir exists and is not a directory")
    _check_writable(out)
    if (out / artifacts.ADAPTER_CONFIG).exists() and not cfg.overwrite:
        raise GlmtuneError(f"{out}: already holds a finished adapter; pass --overwrite "
                           "(Make: OVERWRITE=1) to replace it, or choose another --output-dir")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).is_dir():
        raise GlmtuneError(f"{cfg.resume}: resume checkpoint not found (expected 'auto' or a "
                           "checkpoint-N directory)")
    if not cfg.resume and checkpoint.list_checkpoints(out) and not cfg.overwrite:
        raise GlmtuneError(f"{out}: holds checkpoints of an unfinished run; continue it with "
                           "--resume auto (Make: RESUME=auto), or pass --overwrite to start over")


def _check_writable(out: Path) -> None:
    """Try a write where the run will write, before minutes of loading rather than after."""
    import tempfile

    place = next((p for p in (out, *out.absolute().parents) if p.exists()), Path("."))
    try:
        fd, probe = tempfile.mkstemp(prefix=".glmtune-write-test-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GlmtuneError(f"{out}: output_dir cannot be written ({place}: "
                           f"{exc.strerror or exc}); expected a directory you may write to, "
                           "choose another --output-dir") from exc


def _check_free_space(out: Path, plan: Plan) -> None:
    """A checkpoint and the adapter must fit on the disk: the plan knows their size."""
    if plan.predicted is None:
        return
    # trained parameters take 16 bytes each in memory (weights, grads, two Adam moments); a
    # checkpoint (weights + moments, 12) plus the final adapter (4) take as much on disk
    needed = plan.predicted.trainable
    place = next((p for p in (out, *out.absolute().parents) if p.exists()), Path("."))
    free = shutil.disk_usage(place).free
    if free < needed:
        raise GlmtuneError(f"{out}: {free / 2**20:.0f} MB free on {place}, but a checkpoint "
                           f"and the adapter need about {needed / 2**20:.0f} MB; free some "
                           "space or choose another --output-dir")


class _StopOnSignal:
    """Ctrl-C / SIGTERM (docker stop): finish the step, checkpoint, exit. Twice: abort now."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, tuner: FineTuner):
        self.tuner, self.previous = tuner, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.tuner._stop_requested:
            raise KeyboardInterrupt
        self.tuner._stop_requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step "
                    "(press Ctrl-C again to abort without saving)", self.tuner._stop_requested)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class _Fit:
    """One training run's state; its methods are the recipe's steps."""

    def __init__(self, tuner: FineTuner, out: Path):
        import torch

        self.cfg, self.tuner, self.out = tuner.config, tuner, out
        self.model, self.tokenizer = tuner.model, tuner.tokenizer
        self.dist = tuner.dist
        self.device = torch.device(tuner.plan.device)
        # forward/backward go through the engine's wrapper (DDP, FSDP, DeepSpeed);
        # evaluation and saving use the PEFT model itself
        self.engine = distributed.Engine(tuner.strategy, self.dist, self.device)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16,
                             enabled=tuner.plan.bf16)
        self.pad_id = self.tokenizer.pad_token_id
        rows = len(tuner.train_set.rows)
        if self.dist.world > rows:
            raise GlmtuneError(f"{self.cfg.data}: {rows} training rows cannot feed "
                               f"{self.dist.world} processes; use fewer processes or more data")
        self.global_batch = self.cfg.batch_size * self.dist.world
        self.steps_per_epoch = self._sampler().steps_per_epoch()
        self.total_steps = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch))
        self.eval_every = self.cfg.eval_steps or max(1, self.total_steps // 5)
        self.save_every = self.cfg.save_steps or self.steps_per_epoch
        self.metrics = artifacts.MetricsLog(out / "metrics.jsonl", enabled=self.dist.is_main)
        self.state = checkpoint.TrainerState(config=self._config_record())

    def run(self) -> TrainResult:
        import torch

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.train_model, self.optimizer = self.engine.wrap(self.model, lambda: torch.optim.AdamW(
            self._trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay), cfg)
        params = self._trainable()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if cfg.compile:
            # dynamic: batches are padded to multiples of 8, not to one length
            self.train_model = torch.compile(self.train_model, dynamic=True)
        self._start_or_resume()
        log.info("training: %d rows, %d optimizer steps (%.2f epochs), effective batch %d",
                 len(self.tuner.train_set.rows), self.total_steps,
                 self.total_steps / self.steps_per_epoch, self.global_batch * cfg.grad_accum)
        if self.dist.enabled or self.engine.strategy != "ddp":
            log.info("distributed (%s): %d processes x micro-batch %d x accumulation %d",
                     self.engine.strategy, self.dist.world, cfg.batch_size, cfg.grad_accum)

        started = time.perf_counter()
        batches = self._batches(self.state.rows_seen)
        bar = _progress(self.total_steps, self.state.step)
        window_start, last_loss = time.perf_counter(), None
        plan = self.tuner.plan
        guard = int(plan.budget_bytes * cfg.oom_guard) if plan.budget_bytes and cfg.oom_guard else None
        memory_csv = self.out / "memory.csv" if self.dist.is_main else None
        first_step = self.state.step + 1
        with _StopOnSignal(self.tuner), MemoryMonitor(memory_csv, guard) as memory:
            self.memory = memory
            for step in range(self.state.step + 1, self.total_steps + 1):
                step_started = time.perf_counter()
                loss_sum, tokens, rows = self._optimizer_step(batches, params)
                self._check_finite(step, loss_sum)
                if cfg.compile and step <= first_step + 1:  # what compiling cost, vs a compiled step
                    log.info("step %d took %.1f s%s", step, time.perf_counter() - step_started,
                             " (torch.compile compiling)" if step == first_step else "")
                self.scheduler.step()
                st = self.state
                st.step, st.rows_seen = step, st.rows_seen + rows
                st.window_loss += loss_sum
                st.window_tokens += tokens
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    last_loss = self._log_window(bar, time.perf_counter() - window_start)
                    window_start = time.perf_counter()
                if self.tuner.val_set and (step % self.eval_every == 0 or step == self.total_steps):
                    self._evaluate(step)
                bar.update(1)
                faults.point("step-end", step)
                for callback in self.tuner.callbacks:
                    callback(step, self.tuner)
                if self.dist.any(memory.poll()):
                    batches = self._on_memory_guard(memory, guard, batches)
                stopping = self.dist.any(bool(self.tuner._stop_requested)) and step < self.total_steps
                if stopping and not self.tuner._stop_requested:
                    self.tuner._stop_requested = "another process"
                if stopping or (step % self.save_every == 0 and step < self.total_steps):
                    self._checkpoint()
                if stopping:
                    bar.close()
                    return self._interrupted(time.perf_counter() - started)
        bar.close()
        seconds = time.perf_counter() - started
        log.info("peak RSS %.2f GB (memory.csv has the timeline)", memory.peak_rss / GB)
        self._save()
        self.dist.barrier()
        losses = self.state.eval_losses
        if len(losses) > 1:
            log.info("validation loss %.4f -> %.4f (%.0f%% lower)", losses[0][1], losses[-1][1],
                     100 * (1 - losses[-1][1] / losses[0][1]))
        log.info("done in %.1f s; adapter saved to %s", seconds, self.out)
        return TrainResult(self.out, self.total_steps, [tuple(x) for x in losses], last_loss, seconds)

    # -- steps --------------------------------------------------------------
    def _trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _start_or_resume(self) -> None:
        cfg = self.cfg
        resume_from = (checkpoint.find_resume_point(self.out, cfg.resume,
                                                    weights=not self.engine.sharded)
                       if cfg.resume else None)
        if resume_from is None:
            if cfg.resume:
                log.info("--resume auto: no checkpoint in %s yet, starting from scratch", self.out)
            # --overwrite of an earlier run: its checkpoints must not be resumed into this one
            if self.dist.is_main:
                for _, old in checkpoint.list_checkpoints(self.out):
                    shutil.rmtree(old)
                self.out.mkdir(parents=True, exist_ok=True)
                self.metrics.reset()
            self.dist.barrier()
            if self.tuner.val_set:
                self._evaluate(step=0)
            return
        differences = checkpoint.config_differences(checkpoint.saved_config(resume_from),
                                                    self._config_record())
        if differences and not cfg.resume_override:
            raise GlmtuneError(f"{resume_from}: cannot resume, these settings differ from the "
                               "checkpoint's (pass --resume-override to resume anyway):\n  - "
                               + "\n  - ".join(differences))
        sharded = self.engine.sharded
        self.state = checkpoint.load(resume_from, self.model, None if sharded else self.optimizer,
                                     self.scheduler)
        if sharded:
            self.engine.load_state(resume_from / checkpoint.ENGINE_DIR, self.model, self.optimizer)
        self.state.config = self._config_record()
        self.metrics.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", resume_from, self.state.step)

    def _config_record(self) -> dict:
        """What a checkpoint records of the run: the config and how many processes ran it."""
        return {**self.cfg.to_dict(), "world_size": self.dist.world}

    def _log_window(self, bar, elapsed: float) -> float:
        st = self.state
        loss = st.window_loss / max(st.window_tokens, 1)
        record = {"step": st.step, "epoch": round(st.step / self.steps_per_epoch, 3),
                  "loss": round(loss, 5), "lr": self.scheduler.get_last_lr()[0],
                  # every non-padding token the model processed, prompt included
                  "tokens": st.window_input_tokens,
                  "tokens_per_s": round(st.window_input_tokens / max(elapsed, 1e-9), 1),
                  "rss_gb": round(_rss_gb(), 3)}
        self.metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        rss=f"{record['rss_gb']:.2f}G")
        log.info("%s", {k: record[k] for k in ("loss", "lr", "epoch")})
        st.window_loss, st.window_tokens, st.window_input_tokens = 0.0, 0, 0
        return loss

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak."""
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _sampler(self) -> Sampler:
        cfg = self.cfg
        return Sampler([len(r.input_ids) for r in self.tuner.train_set.rows], seed=cfg.seed,
                       micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum, world=self.dist.world,
                       rank=self.dist.rank, group_by_length=cfg.group_by_length,
                       pack_len=cfg.max_seq_len if cfg.packing else None)

    def _batches(self, rows_seen: int):
        """Endless (micro-batch, rows consumed by all processes) from data position ``rows_seen``."""
        rows = self.tuner.train_set.rows
        for units, consumed in self._sampler().micro_batches(rows_seen):
            if not units:  # this process's share of a ragged end: one row that trains nothing
                idle = dataset.Encoded(rows[0].input_ids, [dataset.IGNORE_INDEX] * len(rows[0].input_ids))
                yield dataset.collate([idle], self.pad_id), consumed
            elif self.cfg.packing:
                yield dataset.collate_packed([[rows[i] for i in unit] for unit in units],
                                             self.pad_id), consumed
            else:
                yield dataset.collate([rows[unit[0]] for unit in units], self.pad_id), consumed

    def _on_memory_guard(self, memory, guard: int, batches):
        cfg = self.cfg
        rss = memory.last_rss / GB
        # DeepSpeed fixed its accumulation when it started: it cannot shrink mid-run
        if cfg.auto_shrink and cfg.batch_size > 1 and not self.engine.deepspeed:
            self.cfg = cfg = halve_batch(cfg)
            log.warning("memory guard: RSS %.2f GB crossed %.2f GB; micro-batch -> %d, accumulation "
                        "-> %d (same effective batch), continuing", rss, guard / GB,
                        cfg.batch_size, cfg.grad_accum)
            memory.rearm()
            return self._batches(self.state.rows_seen)
        self.tuner._stop_requested = "memory guard"
        half = halve_batch(cfg)
        self.shrink_hint = (f"--batch-size {half.batch_size} --grad-accum {half.grad_accum}"
                            + ("" if cfg.gradient_checkpointing else " --gradient-checkpointing"))
        log.warning("memory guard: RSS %.2f GB crossed %.2f GB (%.0f%% of the %.2f GB budget); "
                    "saving a checkpoint and stopping before the system runs out of memory",
                    rss, guard / GB, 100 * cfg.oom_guard, self.tuner.plan.budget_bytes / GB)
        return batches

    def _optimizer_step(self, batches, params) -> tuple[float, int, int]:
        """One optimizer step; returns (summed loss, trained tokens, rows), over all ranks."""
        pairs = [next(batches) for _ in range(self.cfg.grad_accum)]
        micro, rows = [b for b, _ in pairs], sum(n for _, n in pairs)
        local_tokens = sum(int((b["labels"][:, 1:] != dataset.IGNORE_INDEX).sum()) for b in micro)
        local_inputs = sum(int(b["attention_mask"].sum()) for b in micro)
        tokens, inputs = self.dist.sum(local_tokens, local_inputs)
        self.state.window_input_tokens += int(inputs)
        # DDP averages gradients over ranks; scaling by world size turns that into the
        # sum, so the step's gradient is d(total loss / all trained tokens).
        scale = self.dist.world / max(tokens, 1)
        loss_sum = 0.0
        for index, batch in enumerate(micro):
            with self.engine.accumulating(self.train_model, last=index == len(micro) - 1):
                part = self._loss_sum(batch)
                self.engine.backward(part * scale)
            loss_sum += part.item()
        self.grad_norm = self.engine.step(self.optimizer, params, self.cfg.max_grad_norm)
        loss_sum = self.dist.sum(loss_sum)[0]
        return loss_sum, int(tokens), rows

    def _check_finite(self, step: int, loss_sum: float) -> None:
        """Stop at the first NaN/inf: every later step and any save would spread it."""
        norm = self.grad_norm
        if math.isfinite(loss_sum) and (norm is None or math.isfinite(norm)):
            return
        what = (f"the training loss is {loss_sum}" if not math.isfinite(loss_sum)
                else f"the gradient norm is {norm}")
        saved = checkpoint.list_checkpoints(self.out)
        kept = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint exists"
        raise GlmtuneError(
            f"step {step}: {what}; training stopped and nothing of this run was saved after it "
            f"({kept}; an adapter already in {self.out} is untouched). Try a lower --lr (now "
            f"{self.cfg.lr:g}), gradient clipping (--max-grad-norm 1.0), --bf16 false, or look "
            "for extreme values in the rows of this step")

    def _loss_sum(self, batch):
        import torch

        batch = {k: v.to(self.device) for k, v in batch.items()}
        model = self.train_model if torch.is_grad_enabled() else self.model
        with torch.autocast(**self.autocast):
            return summed_loss(model, batch, self.tuner.fused_head)

    def _evaluate(self, step: int) -> float:
        import torch

        rows = self.tuner.val_set.rows
        total, tokens = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(rows), self.cfg.batch_size):
                batch = dataset.collate(rows[start:start + self.cfg.batch_size], self.pad_id)
                total += self._loss_sum(batch).item()
                tokens += int((batch["labels"][:, 1:] != dataset.IGNORE_INDEX).sum())
        self.model.train()
        value = total / max(tokens, 1)
        st = self.state
        st.eval_losses.append([step, value])
        if step and (st.best_step is None or value < dict(map(tuple, st.eval_losses))[st.best_step]):
            st.best_step = step
        self.metrics.write({"step": step, "eval_loss": round(value, 5)})
        log.info("%s", {"eval_loss": round(value, 4), "step": step})
        return value

    def _checkpoint(self) -> None:
        protect = {self.state.best_step} if self.cfg.save_best and self.state.best_step else set()
        saving = dict(keep=self.cfg.save_total_limit, protect=protect)
        if self.engine.sharded:  # every rank writes its part first
            weights = self.engine.gather_trainable(self.model)
            if self.dist.is_main:
                checkpoint.prepare_shared_staging(self.out, self.state.step)
            self.dist.barrier()
            staged = checkpoint.shared_staging(self.out, self.state.step)
            self.engine.save_state(staged / checkpoint.ENGINE_DIR, self.model, self.optimizer)
            self.dist.barrier()
            saving.update(staged=staged, weights=weights)
        if self.dist.is_main:
            optimizer = None if self.engine.sharded else self.optimizer
            path = checkpoint.save(self.out, self.state, self.model, optimizer, self.scheduler, **saving)
            log.info("checkpoint saved: %s", path)
        self.dist.barrier()

    def _interrupted(self, seconds: float) -> TrainResult:
        command = _resume_command(getattr(self, "shrink_hint", ""))
        log.warning("stopped at step %d of %d; resume with:\n  %s", self.state.step,
                    self.total_steps, command)
        return TrainResult(self.out, self.state.step, [tuple(x) for x in self.state.eval_losses],
                           None, seconds, interrupted=self.tuner._stop_requested,
                           resume_command=command)

    def _save(self) -> None:
        """Adapter + tokenizer + resolved config, staged then published atomically (rank 0)."""
        weights = self.engine.gather_trainable(self.model)  # every rank takes part
        if not self.dist.is_main:
            return
        with writing(self.out, "the run's checkpoints are intact and an earlier adapter is "
                     "kept"), artifacts.staging_dir(self.out) as staged:
            self.model.save_pretrained(staged, **({} if weights is None else {"state_dict": weights}))
            self.tokenizer.save_pretrained(staged)
            # the resolved template, so predict/eval format prompts exactly as training did
            save_yaml(replace(self.cfg, template=self.tuner.family.template),
                      staged / artifacts.RUN_CONFIG)
            artifacts.publish_files(staged, self.out)
        if self.metrics.records:
            artifacts.plot_losses(self.metrics.records, self.out / "loss.png")


def _resume_command(extra: str = "") -> str:
    """The command that continues this run: the same one, with resume on (and ``extra`` flags)."""
    import shlex
    import sys

    from glmtune.config import make_variables

    world = distributed.from_environment().world
    if "--from-make" in sys.argv:  # started by `make train VAR=...`
        given = [f"{var}={shlex.quote(os.environ[var])}" for var in make_variables(TrainConfig)
                 if os.environ.get(var) and var != "RESUME"]
        target = ["train"] if world == 1 else ["train-ddp", f"NPROC={world}"]
        if extra:  # flags Make has no variables for go through the glmtune command
            return f"glmtune train --from-make {extra} --resume auto  # with the same Make variables"
        return shlex.join(["make", *target]) + "".join(" " + g for g in given) + " RESUME=auto"
    launcher = {"glmtune": ["glmtune"], "__main__.py": ["python", "-m", "glmtune"]}
    if world > 1:  # the same launch again: torchrun / accelerate set these
        launcher = {name: ["torchrun", f"--nproc_per_node={world}", "-m", "glmtune"]
                    for name in launcher}
    if sys.argv and Path(sys.argv[0]).name in launcher:
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume", "auto"])
        return shlex.join([*launcher[Path(sys.argv[0]).name], *argv]) + (f" {extra}" if extra else "")
    return "the same call with resume='auto' (e.g. TrainConfig(..., resume='auto'))"


def _add_embedding_noise(model, alpha: float) -> None:
    """NEFTune (Jain et al., 2023): noise on the input embeddings in training mode only.

    Uniform in +-alpha / sqrt(sequence length x hidden size); it works against
    memorising the training rows, which small data sets invite.
    """
    def add_noise(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    import torch

    model.get_input_embeddings().register_forward_hook(add_noise)


def _rss_gb() -> float:
    return monitor.sample_rss() / GB  # the same unit as memory.csv and the guard


def _progress(total: int, done: int = 0):
    from tqdm.auto import tqdm

    # disable=None: no bar when output is not a terminal (CI logs, files); the
    # log lines carry the same numbers there.
    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True,
                leave=True, disable=None)
