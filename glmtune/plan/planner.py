"""Config + hardware + model shape -> the settings a run uses, and why.

The plan decides device, bf16, threads, base dtype and quantization, then
predicts peak memory (``estimate.py``). When the prediction exceeds the
budget it shrinks the run step by step — gradient checkpointing, then the
micro-batch (raising accumulation so the effective batch stays), then
quantization, then sequence length — and says which. When nothing fits it
refuses before anything is loaded, saying what would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.plan import estimate as est
from glmtune.plan import speed
from glmtune.plan.hardware import GB, Hardware, describe

MIN_SEQ_LEN = 128
# what reading a model's shape from an unusual config.json raises
SHAPE_ERRORS = (KeyError, TypeError, ValueError, ZeroDivisionError)


@dataclass
class Plan:
    device: str
    bf16: bool
    threads: int
    quant: str = "none"
    base_dtype: str = "float32"
    budget_bytes: int | None = None
    predicted: est.Estimate | None = None
    step_time: speed.StepTime | None = None  # at max_seq_len; None where not predicted (GPUs)
    reasons: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.base_dtype)

    def describe(self) -> str:
        head = (f"device={self.device} bf16={'on' if self.bf16 else 'off'} "
                f"threads={self.threads} quant={self.quant} base_dtype={self.base_dtype}")
        if self.predicted is not None:
            head += f" predicted peak {self.predicted.peak / GB:.2f} GB"
            if self.budget_bytes:
                head += f" of a {self.budget_bytes / GB:.2f} GB budget"
        if self.step_time is not None:
            head += f"; predicted {self.step_time.seconds:.2f} s/step at full length"
        return head + "".join(f"\n  - {r}" for r in self.reasons + self.changes)

    def guard_bytes(self, oom_guard: float) -> int | None:
        """The RSS at which the memory guard acts: a fraction of the budget (0: never)."""
        return int(self.budget_bytes * oom_guard) if self.budget_bytes and oom_guard else None

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("predicted", "step_time")}
        data["predicted_step_s"] = round(self.step_time.seconds, 3) if self.step_time else None
        data["predicted_gb"] = self.predicted.breakdown() if self.predicted else None
        data["budget_gb"] = round(self.budget_bytes / GB, 3) if self.budget_bytes else None
        return data


def report(hw: Hardware, plan: Plan, final: TrainConfig, preset_note: str | None = None,
           processes: int = 1) -> str:
    """What `glmtune plan` prints: hardware, preset, plan, predicted peak memory, settings."""
    lines = [describe(hw)]
    if preset_note:
        lines.append(f"preset: {preset_note}")
    lines.append(f"plan: {plan.describe()}")
    if plan.predicted is not None:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in plan.predicted.breakdown().items() if k != "peak")
        each = " per process" if processes > 1 else ""
        lines.append(f"predicted peak memory{each}: {plan.predicted.peak / GB:.2f} GB ({parts} GB)")
    if plan.step_time is not None:
        lines.append("predicted step time at full length (micro-batch x max_seq_len): "
                     + plan.step_time.describe())
    lines.append("settings: " + ", ".join(f"{k}={getattr(final, k)}" for k in (
        "quant", "batch_size", "grad_accum", "max_seq_len", "gradient_checkpointing", "lora_r",
        "max_samples")))
    return "\n".join(lines)


def memory_budget(config: TrainConfig, hw: Hardware, processes: int = 1) -> int:
    """Per process: MEMORY_LIMIT if given, else what is available now minus a safety margin.

    On a GPU each process has its own card; on a CPU the processes of one
    machine share its RAM.
    """
    if config.memory_limit is not None:
        limit = int(config.memory_limit * GB)
        return limit if hw.gpus else limit // max(1, processes)
    if hw.gpus:
        free = hw.gpus[0].free_bytes
        return int(free - max(0.5 * GB, 0.05 * free))
    return int(hw.available_ram - max(0.75 * GB, 0.1 * hw.available_ram)) // max(1, processes)


def make_plan(config: TrainConfig, hw: Hardware, model_config: dict | None = None,
              shard_bytes: int = 0, train_embeddings: bool = False,
              processes: int = 1, pickled: bool = False) -> tuple[Plan, TrainConfig]:
    """The plan, and the config with any memory-driven changes applied.

    ``processes``: training processes on this machine (torchrun), which share
    its cores and, on a CPU, its memory.
    """
    reasons = []
    if config.bf16 == "auto":
        bf16 = hw.bf16
        where = "GPU" if hw.cuda_devices else "CPU"
        reasons.append(f"bf16 autocast {'on' if bf16 else 'off'}: the {where} "
                       f"{'supports' if bf16 else 'lacks'} fast bf16"
                       + ("" if hw.cuda_devices else " (avx512_bf16 / AMX)"))
    else:
        bf16 = config.bf16 == "true"
        reasons.append(f"bf16 autocast {'on' if bf16 else 'off'}: set by --bf16")
        if bf16 and not hw.bf16 and not hw.cuda_devices:
            reasons.append("warning: this CPU has no native bf16; bf16 will be slower than fp32")
    threads = config.threads or max(1, hw.physical_cores // processes)
    reasons.append(f"{threads} CPU threads" + ("" if config.threads else
                   " (physical cores" + (f" / {processes} processes)" if processes > 1 else ")")))
    if config.base_dtype == "auto":
        base_dtype = "bfloat16" if bf16 else "float32"
        reasons.append(f"frozen base weights in {base_dtype}"
                       + (" (half the memory, no per-step casts)" if bf16 else ""))
    else:
        base_dtype = config.base_dtype
    plan = Plan(device=hw.device, bf16=bf16, threads=threads, quant=config.quant,
                base_dtype=base_dtype, reasons=reasons)
    if model_config is None:
        return plan, config
    return _fit_memory(plan, config, hw, model_config, shard_bytes, train_embeddings, processes,
                       pickled)


def plan_for_model(config: TrainConfig, hw: Hardware, source,
                   processes: int = 1) -> tuple[Plan, TrainConfig, bool]:
    """The plan for training ``source`` (a resolved model): what `glmtune train` and
    `glmtune plan` both use. Returns (plan, fitted config, trains embeddings?)."""
    from glmtune.model import tiny_glm

    train_embeddings = config.train_embeddings == "true" or (
        config.train_embeddings == "auto" and tiny_glm.is_tiny(source.path))
    shard = est.largest_shard_bytes(source.path) if source.local else 0
    plan, fitted = make_plan(config, hw, source.config or None, shard, train_embeddings, processes,
                             pickled=source.local and est.pickled_only(source.path))
    plan.step_time = predict_step(plan, fitted, source.config, train_embeddings,
                                  fitted.batch_size * fitted.max_seq_len, fitted.max_seq_len)
    if train_embeddings:
        plan.reasons.append("training embeddings and LM head too" + (
            " (tiny-glm's base is random: LoRA alone cannot learn on it)"
            if tiny_glm.is_tiny(source.path) else ""))
    return plan, fitted, train_embeddings


def predict_step(plan: Plan, config: TrainConfig, model_config: dict | None,
                 train_embeddings: bool, tokens: float, seq_len: float) -> speed.StepTime | None:
    """One optimizer step's predicted time with micro-batches of ``tokens`` tokens; None
    on GPUs (no rates measured there yet) or without a config.json."""
    from glmtune.plan import hardware

    if plan.device != "cpu" or not model_config:
        return None
    try:
        shape = est.shape_from_config(model_config)
    except SHAPE_ERRORS:  # _fit_memory has said so already
        return None
    hardware.set_threads(plan.threads)  # the rate is measured with the run's threads
    return speed.step_time(shape,
                           _settings(plan, config, train_embeddings),
                           tokens=max(1, round(tokens)), seq_len=max(1, round(seq_len)),
                           micro_batches=config.grad_accum,
                           compute_dtype="bfloat16" if plan.bf16 else "float32")


def _settings(plan: Plan, config: TrainConfig, train_embeddings: bool,
              processes: int = 1) -> est.Settings:
    sharded = config.strategy in ("fsdp", "zero3")  # parameters and optimizer state split
    return est.Settings(quant=config.quant, base_dtype=plan.base_dtype, lora_r=config.lora_r,
                        train_embeddings=train_embeddings, batch_size=config.batch_size,
                        seq_len=config.max_seq_len,
                        gradient_checkpointing=config.gradient_checkpointing, device=plan.device,
                        lora_experts=config.lora_experts,
                        shards=processes if sharded else 1)


def _fit_memory(plan: Plan, config: TrainConfig, hw: Hardware, model_config: dict,
                shard_bytes: int, train_embeddings: bool,
                processes: int, pickled: bool = False) -> tuple[Plan, TrainConfig]:
    try:
        shape = est.shape_from_config(model_config)
    except SHAPE_ERRORS:
        plan.reasons.append("memory: cannot read the model's shape from config.json; "
                            "no prediction (the live guard still watches)")
        return plan, config
    budget = memory_budget(config, hw, processes)
    plan.budget_bytes = budget
    if not shard_bytes:  # no weight files here (yet): what loading reads at once, from the shape
        shard_bytes = 2 * shape.largest_tensor_params()  # bf16, as checkpoints ship
    if shape.expert_params:
        plan.reasons.append(
            f"mixture of experts: all {shape.experts} routed experts per layer resident "
            f"({shape.expert_params / 1e9:.1f} B of {shape.total_params / 1e9:.1f} B parameters), "
            f"{shape.experts_per_token} run per token; quantization leaves them in "
            f"{plan.base_dtype} (bitsandbytes quantizes Linear layers, the experts are fused "
            "3-D weights)")
    if config.strategy in ("fsdp", "zero3") and processes > 1:
        plan.reasons.append(f"memory per process: {config.strategy} splits weights and optimizer "
                            f"state over {processes} processes")

    def predict(c: TrainConfig) -> est.Estimate:
        return est.estimate(shape, _settings(plan, c, train_embeddings, processes), shard_bytes,
                            pickled)

    current = predict(config)
    for step in _shrink_steps(config):
        if current.peak <= budget:
            break
        candidate, note = step
        trial = predict(candidate)
        plan.changes.append(f"{note} to fit the {budget / GB:.2f} GB budget "
                            f"(predicted {current.peak / GB:.2f} -> {trial.peak / GB:.2f} GB)")
        config, current = candidate, trial
    if plan.device == "cpu" and config.quant != "none" and current.peak <= budget:
        config, current = _fewer_micro_batches(plan, config, current, predict, budget)
    plan.quant = config.quant
    plan.predicted = current
    if current.peak > budget:
        raise GlmtuneError(
            f"memory: this run needs about {current.peak / GB:.1f} GB but the budget is "
            f"{budget / GB:.1f} GB (MEMORY_LIMIT, default: available memory minus a margin); "
            f"the smallest setting tried ({_brief(config)}) still does not fit. It would fit "
            f"with MEMORY_LIMIT={current.peak / GB:.1f} or more"
            + _sharding_hint(lambda n: est.estimate(shape, replace(
                _settings(plan, config, train_embeddings), shards=n), shard_bytes, pickled).peak,
                config, budget, "machines" if plan.device == "cpu" else "devices")
            + _smaller_model_hint(shape, budget, current) + ". Nothing was loaded.")
    return plan, config


def _shrink_steps(config: TrainConfig):
    """Ever-cheaper variants of ``config``: each step keeps the previous ones' changes."""
    c = config
    if not c.gradient_checkpointing:
        c = replace(c, gradient_checkpointing=True)
        yield c, "turned on gradient checkpointing"
    while c.batch_size > 1:
        before, c = c, halve_batch(c)
        yield c, (f"micro-batch {before.batch_size} -> {c.batch_size}, accumulation "
                  f"{before.grad_accum} -> {c.grad_accum} (same effective batch)")
    for quant in ("8bit", "4bit"):
        if quant == "8bit" and c.strategy in ("fsdp", "zero3"):
            continue  # 8-bit weights cannot be sharded (distributed.strategy_problems)
        if _quant_rank(quant) > _quant_rank(c.quant):
            c = replace(c, quant=quant)
            yield c, f"quantized the base to {quant}"
    while c.max_seq_len > MIN_SEQ_LEN:
        c = replace(c, max_seq_len=max(MIN_SEQ_LEN, c.max_seq_len // 2))
        yield c, f"max_seq_len -> {c.max_seq_len} (longer rows are truncated)"


def _fewer_micro_batches(plan: Plan, config: TrainConfig, current: est.Estimate, predict,
                         budget: int) -> tuple[TrainConfig, est.Estimate]:
    """A quantized base is dequantized once per pass and micro-batch (forward, backward and
    the recomputation), whatever the micro-batch's size (measured: ChatGLM3-6B at 4-bit on
    2 AVX2 cores, 1.8 s per pass blockwise, 16 s before; its 128-token matmuls take 7 s).
    Fewer, larger micro-batches of the same effective batch pay it less often; the loss is
    the mean over the step's tokens either way, so the update is the same."""
    start = config
    while config.grad_accum % 2 == 0:
        candidate = replace(config, batch_size=config.batch_size * 2, grad_accum=config.grad_accum // 2)
        trial = predict(candidate)
        if trial.peak > budget:
            break
        config, current = candidate, trial
    if config is not start:
        plan.changes.append(
            f"micro-batch {start.batch_size} -> {config.batch_size}, accumulation {start.grad_accum} "
            f"-> {config.grad_accum} (same effective batch): the {config.quant} base is dequantized "
            "once per micro-batch, so fewer, larger ones are faster "
            f"(predicted {current.peak / GB:.2f} GB)")
    return config, current


def halve_batch(c: TrainConfig) -> TrainConfig:
    """Half the micro-batch (1 when it is odd) and accumulation to match: same effective batch."""
    smaller = c.batch_size // 2 if c.batch_size % 2 == 0 else 1
    return replace(c, batch_size=smaller, grad_accum=c.grad_accum * c.batch_size // smaller)


def _quant_rank(quant: str) -> int:
    return {"none": 0, "8bit": 1, "4bit": 2}[quant]


def _brief(c: TrainConfig) -> str:
    return (f"quant {c.quant}, batch {c.batch_size}, seq {c.max_seq_len}, "
            f"checkpointing {'on' if c.gradient_checkpointing else 'off'}")


MAX_HINT_DEVICES = 64


def _sharding_hint(peak_with_shards, config: TrainConfig, budget: int, what: str) -> str:
    """Big models (GLM-4.5-Air: 106 B parameters) fit by splitting them over devices."""
    for n in (2, 4, 8, 16, 32, MAX_HINT_DEVICES):
        if peak_with_shards(n) <= budget:
            how = config.strategy if config.strategy in ("fsdp", "zero3") else "fsdp or zero3"
            return (f", or sharded over {n} {what} of this size (--strategy {how}, "
                    f"{peak_with_shards(n) / GB:.1f} GB each)")
    return ""


def _smaller_model_hint(shape: est.Shape, budget: int, current: est.Estimate) -> str:
    fixed = current.runtime + current.activations + current.logits + current.trainable
    per_param = current.weights / max(shape.total_params, 1)
    fits = (budget - fixed) / per_param if budget > fixed else 0
    if fits <= 0:
        return ""
    return f", or with a model of at most about {fits / 1e9:.1f} B parameters at these settings"
