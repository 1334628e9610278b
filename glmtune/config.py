"""The one configuration schema.

``TrainConfig`` is the single source of truth: the YAML keys are its field
names, the CLI flags and the Makefile variables are derived from its field
metadata (``cli.py`` and ``glmtune config --make-vars``), and the Python API
takes it directly. Add a field here and every front end gets it.

Precedence, lowest first: field defaults < YAML file (``--config``) < Make
variables (only when the Makefile asks for them) < CLI flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from glmtune.errors import ConfigError, excerpt

DEFAULT_MODEL = "tiny-glm"
DEFAULT_TRAIN_FILE = "data/train_triplet.jsonl"
DEFAULT_OUTPUT_DIR = "models/chatglm-lora"

QUANT_LEVELS = ("none", "4bit", "8bit")
TRI_STATE = ("auto", "true", "false")


def _opt(help: str, *, flag: str | None = None, make: str | None = None,
         choices: tuple[str, ...] | None = None, default: Any = None,
         default_factory: Any = None):
    """A config field; its metadata is what the CLI and the Makefile read."""
    meta = {"help": help, "flag": flag, "make": make, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def strategy_problems(strategy: str, quant: str) -> list[str]:
    """What makes a launch impossible, found before anything is loaded."""
    found = []
    if quant == "8bit" and strategy in ("fsdp", "zero3"):
        found.append(f"strategy: {strategy} shards the weights and 8-bit weights cannot be "
                     "sharded; use --quant 4bit (stored as bf16 for sharding) or --strategy "
                     "zero2 / ddp")
    if strategy in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            found.append(f"strategy: {strategy} needs DeepSpeed, which is not installed "
                         "(pip install deepspeed)")
    return found


class _Schema:
    """What every config class shares: ``problems()`` is everything wrong with it (its own
    ``_checks`` plus the choice and template checks every class gets here), and
    ``validate`` reports them all in one error, so the user fixes them in one go."""

    def _checks(self) -> list[str]:
        return []

    def problems(self) -> list[str]:
        return self._checks() + _choice_problems(self) + _template_problems(self)

    def validate(self, source: str = "configuration"):
        found = self.problems()
        if found:
            raise ConfigError(found, source)
        return self


@dataclass
class TrainConfig(_Schema):
    # --- what to train -----------------------------------------------------
    model: str = _opt("base model: 'tiny-glm' (embedded, built locally), a local HF directory, "
                      "or a hub id on a machine that can reach the hub",
                      make="MODEL", default=DEFAULT_MODEL)
    trust_remote_code: bool = _opt("allow the model directory's own Python code to run "
                                   "(models transformers cannot build; ChatGLM-6B/2/3 load "
                                   "natively without it)", make="TRUST_REMOTE_CODE",
                                   default=False)
    data: str = _opt("training data: .txt, .csv, .json, .jsonl, .xlsx (first sheet, header "
                     "row) or .parquet", make="DATA", default=DEFAULT_TRAIN_FILE)
    encoding: str = _opt("text encoding of the data files: auto (UTF-8, else GB18030/GBK as "
                         "Chinese Excel and Windows save, noted in the log), utf-8 or gb18030",
                         make="DATA_ENCODING", choices=("auto", "utf-8", "gb18030"),
                         default="auto")
    val_data: str | None = _opt("validation data in the same format as --data; 'auto' uses the "
                                "training file's sibling named val* (train_x.jsonl -> "
                                "val_x.jsonl) when it exists; '' for none",
                                make="VAL_DATA", default="auto")
    output_dir: str = _opt("where the adapter, logs and metrics are written",
                           make="OUTPUT_DIR", default=DEFAULT_OUTPUT_DIR)
    overwrite: bool = _opt("replace a finished adapter already in --output-dir",
                           make="OVERWRITE", default=False)
    max_samples: int | None = _opt("use at most this many training rows", make="MAX_SAMPLES")
    template: str = _opt("prompt format: auto (from the model family), chatglm1, chatglm2, "
                         "chatglm3, glm4, glm45, chat_template or plain", default="auto")

    # --- schedule ----------------------------------------------------------
    epochs: float = _opt("passes over the training data (fractions allowed)",
                         make="NUM_EPOCHS", default=5.0)
    max_steps: int | None = _opt("stop after this many optimizer steps (overrides --epochs)",
                                 make="MAX_STEPS")
    batch_size: int = _opt("rows per micro-batch", make="BATCH_SIZE", default=16)
    grad_accum: int = _opt("micro-batches per optimizer step", make="GRAD_ACCUM", default=1)
    lr: float = _opt("peak learning rate", flag="--lr", make="LEARNING_RATE", default=2e-3)
    warmup_ratio: float = _opt("fraction of steps with linear learning-rate warm-up",
                               default=0.05)
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
    max_grad_norm: float = _opt("gradient clipping norm (0 disables)", default=1.0)
    max_seq_len: int = _opt("longer rows are truncated (and counted in the log)",
                            make="MAX_SEQ_LEN", default=256)
    packing: bool = _opt("pack each micro-batch's rows into as few sequences of --max-seq-len "
                         "tokens as they fit (position ids restart per row, attention stays "
                         "within each row): the same rows per step without the padding; for "
                         "GLM, GLM-4, ChatGLM2/3, GLM-4.5+, Llama and Qwen2 models",
                         make="PACKING", default=False)
    group_by_length: bool = _opt("batch rows of similar length together (shuffled in groups of "
                                 "steps): less padding, faster on mixed lengths, but less varied "
                                 "batches (off by default: it cost the triplet job F1)",
                                 make="GROUP_BY_LENGTH", default=False)
    seed: int = _opt("seed for initialisation, data order and dropout", make="SEED", default=42)

    # --- LoRA --------------------------------------------------------------
    lora_r: int = _opt("LoRA rank", make="LORA_R", default=16)
    lora_alpha: int | None = _opt("LoRA alpha (default: 2 x rank)", make="LORA_ALPHA")
    lora_dropout: float = _opt("dropout on the LoRA input", make="LORA_DROPOUT", default=0.0)
    target_modules: str = _opt("comma-separated module names to adapt, or 'auto' (per family)",
                               default="auto")
    lora_experts: bool = _opt("MoE models (GLM-4.5 ... 4.7, GLM-4.7-Flash): also put LoRA on the "
                              "routed experts' fused weights (default: attention, dense MLP and "
                              "shared experts only; the router is never adapted by default)",
                              make="LORA_EXPERTS", default=False)
    train_embeddings: str = _opt("also train token embeddings and LM head: auto (only for the "
                                 "randomly initialised tiny-glm), true or false",
                                 choices=TRI_STATE, default="auto")
    neftune_alpha: float = _opt("NEFTune: uniform noise of this scale on the input embeddings "
                                "while training (0 = off; 5 is the paper's usual value)",
                                make="NEFTUNE_ALPHA", default=0.0)

    # --- hardware ----------------------------------------------------------
    preset: str = _opt("settings for a kind of machine: none, auto (picked from the detected "
                       "hardware), a CPU memory tier cpu-4gb|cpu-8gb|cpu-16gb|cpu-32gb, a GPU "
                       "preset small|medium|large, or fast (a quick test); explicit options "
                       "override it", make="PRESET", default="none")
    memory_limit: float | None = _opt("memory budget in GB (default: available memory minus a "
                                      "margin); the plan shrinks the run to fit it",
                                      make="MEMORY_LIMIT")
    oom_guard: float = _opt("checkpoint and stop when RSS crosses this fraction of the budget "
                            "(0 disables)", make="OOM_GUARD", default=0.9)
    auto_shrink: bool = _opt("when the memory guard fires, halve the micro-batch and double "
                             "accumulation instead of stopping", make="AUTO_SHRINK", default=False)
    quant: str = _opt("load the frozen base quantized", make="QUANT_LEVEL",
                      choices=QUANT_LEVELS, default="none")
    bf16: str = _opt("bf16 autocast: auto (when the CPU/GPU supports it), true or false",
                     choices=TRI_STATE, default="auto")
    base_dtype: str = _opt("dtype of the frozen, unquantized base weights: auto (bfloat16 where "
                           "bf16 is fast, else float32), float32 or bfloat16; trained "
                           "parameters are always float32", make="BASE_DTYPE",
                           choices=("auto", "float32", "bfloat16"), default="auto")
    gradient_checkpointing: bool = _opt("recompute activations in backward to save memory",
                                        make="GRADIENT_CHECKPOINTING", default=False)
    threads: int | None = _opt("CPU threads for torch/OMP/MKL (default: physical cores)",
                               make="NUM_THREADS")
    fused: bool | None = _opt("fast path: fused LoRA, RMSNorm and head + loss kernels where the "
                              "model allows (--no-fused runs PEFT's reference layers and full "
                              "logits); unset: on for CPU training, off on CUDA, where SDPA "
                              "attention keeps no probabilities and no GPU benchmark has shown "
                              "the kernels help yet", make="FUSED")
    strategy: str = _opt("how several processes share the work: auto (DDP, or what an "
                         "`accelerate launch --config_file` asked for), ddp, fsdp (PyTorch FSDP2), "
                         "zero2 or zero3 (DeepSpeed ZeRO)", make="STRATEGY",
                         choices=("auto", "ddp", "fsdp", "zero2", "zero3"), default="auto")
    compile: bool = _opt("torch.compile the training forward/backward (opt-in: the first steps "
                         "compile for a minute or more; needs a C++ compiler on CPU)",
                         make="COMPILE", default=False)

    # --- logging and evaluation --------------------------------------------
    logging_steps: int = _opt("log loss / lr / speed every N optimizer steps", default=10)
    eval_steps: int | None = _opt("evaluate every N optimizer steps (default: 5 times a run)",
                                  make="EVAL_STEPS")
    max_eval_samples: int | None = _opt("evaluate on at most this many validation rows",
                                        default=None)

    # --- checkpoints and resume ---------------------------------------------
    save_steps: int | None = _opt("write a resumable checkpoint every N optimizer steps "
                                  "(default: at the end of each epoch)", make="SAVE_STEPS")
    save_total_limit: int | None = _opt("keep at most this many checkpoints (oldest pruned "
                                        "only after a newer one is complete)",
                                        make="SAVE_TOTAL_LIMIT", default=2)
    save_best: bool = _opt("also keep the checkpoint with the lowest validation loss",
                           default=False)
    resume: str | None = _opt("continue an interrupted run: 'auto' (newest complete checkpoint "
                              "in --output-dir) or a checkpoint-N path", make="RESUME")
    resume_override: bool = _opt("resume even though settings that change training differ "
                                 "from the checkpoint's", default=False)

    # ------------------------------------------------------------------------
    def _checks(self) -> list[str]:
        # inf/nan make no sense for any float setting: they train NaN weights or overflow
        found = [f"{f.name}: must be a finite number, got {getattr(self, f.name)}"
                 for f in fields(self) if isinstance(getattr(self, f.name), float)
                 and not math.isfinite(getattr(self, f.name))]
        for name in ("batch_size", "grad_accum", "max_seq_len", "lora_r", "logging_steps"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be a positive integer, got {getattr(self, name)}")
        for name in ("max_samples", "max_steps", "eval_steps", "max_eval_samples", "threads",
                     "lora_alpha", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                found.append(f"{name}: must be a positive integer or unset, got {value}")
        if not self.epochs > 0:
            found.append(f"epochs: must be > 0, got {self.epochs}")
        if not self.lr > 0:
            found.append(f"lr: must be > 0, got {self.lr}")
        if self.neftune_alpha < 0:
            found.append(f"neftune_alpha: must be >= 0, got {self.neftune_alpha}")
        found += strategy_problems(self.strategy, self.quant)
        if not 0 <= self.lora_dropout < 1:
            found.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.oom_guard <= 1:
            found.append(f"oom_guard: must be a fraction in [0, 1], got {self.oom_guard}")
        if self.memory_limit is not None and not self.memory_limit > 0:
            found.append(f"memory_limit: must be > 0 GB, got {self.memory_limit}")
        from glmtune.plan.presets import PRESETS

        if self.preset not in ("none", *PRESETS):
            found.append(f"preset: must be one of none, {', '.join(PRESETS)}, "
                         f"got {excerpt(self.preset)}")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            found.append("weight_decay and max_grad_norm: must be >= 0")
        return found + _empty_problems(self, "model", "data", "output_dir")

    @classmethod
    def from_preset(cls, preset: str, *layers: dict[str, Any], hw=None, **overrides) -> "TrainConfig":
        """Defaults < preset < each layer < keyword overrides: explicit settings win."""
        from glmtune.plan.presets import preset_overrides

        return build_config(cls, preset_overrides(preset, hw), *layers, overrides,
                            {"preset": preset})

    @property
    def resolved_val_data(self) -> str | None:
        if self.val_data != "auto":
            return self.val_data or None
        train = Path(self.data)
        if "train" not in train.name:
            return None
        sibling = train.with_name(train.name.replace("train", "val", 1))
        return str(sibling) if sibling.is_file() else None

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEMO_PROMPT = "请从以下文本中抽取三元组，格式为(主体, 关系, 客体):\n苹果公司是一家美国的科技公司。"


@dataclass
class PredictConfig(_Schema):
    """Generation with a base model and (optionally) a trained adapter."""

    adapter: str = _opt("adapter directory written by `glmtune train` ('' for the bare base model)",
                        make="ADAPTER", default=DEFAULT_OUTPUT_DIR)
    model: str | None = _opt("base model (default: the one the adapter was trained on)",
                             make="MODEL")
    trust_remote_code: bool = _opt("allow the model directory's own Python code to run",
                                   make="TRUST_REMOTE_CODE", default=False)
    template: str = _opt("prompt format (default: as in training, else from the model family)",
                         default="auto")
    prompt: str = _opt("the prompt to answer", make="PROMPT", default=DEMO_PROMPT)
    max_new_tokens: int = _opt("longest answer in tokens", make="MAX_NEW_TOKENS", default=128)
    out: str | None = _opt("also write the answer to this file", make="PREDICTION_FILE")
    long_prompt: str = _opt("a prompt that does not fit the model's context (with room for "
                            "--max-new-tokens): refuse it, or truncate it (its first part is "
                            "kept) with a warning", choices=("refuse", "truncate"),
                            default="refuse")
    quant: str = _opt("load the base quantized (an adapter trained on a quantized base works on "
                      "the full one and the other way round)", make="QUANT_LEVEL",
                      choices=QUANT_LEVELS, default="none")
    bf16: str = _opt("bf16 autocast: auto, true or false", choices=TRI_STATE, default="auto")
    threads: int | None = _opt("CPU threads (default: physical cores)", make="NUM_THREADS")
    file: str | None = _opt("answer every prompt in this file instead of --prompt (.txt: one "
                            "prompt per line; .jsonl: a 'prompt' per row) and append the answers "
                            "to --out as JSON Lines (default: <file>.predictions.jsonl beside "
                            "it); a rerun skips prompts already answered", make="FILE")
    show_thinking: bool = _opt("keep a reasoning model's <think>...</think> block in the answer "
                               "(default: only the answer after it)", make="SHOW_THINKING",
                               default=False)

    def _checks(self) -> list[str]:
        found = []
        if self.file and self.out and Path(self.out).suffix.lower() != ".jsonl":
            found.append(f"out: batch answers (--file) are written as JSON Lines; give a .jsonl "
                         f"path, got {self.out!r}")
        found += _inference_problems(self) + _nothing_to_load(self.adapter, self.model, "run")
        if not self.file and not self.prompt.strip():
            found.append("prompt: must not be empty or only whitespace")
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            found.append(f"prompt: contains a lone surrogate at character {exc.start} (half "
                         "of an emoji or other character; expected valid Unicode text)")
        return found



def _same(cls: type, name: str, **changes):
    """Field ``name`` of ``cls`` again (optionally changed), so commands that share an option
    share its flag, help, Make variable and default instead of drifting apart."""
    f = cls.__dataclass_fields__[name]
    meta = {key: changes.get(key, f.metadata.get(key))
            for key in ("help", "flag", "make", "choices")}
    return _opt(meta["help"], flag=meta["flag"], make=meta["make"], choices=meta["choices"],
                default=changes.get("default", f.default))


def _inference_problems(config) -> list[str]:
    """Checks every command that loads a model for generation shares with PredictConfig."""
    found = []
    for name in ("max_new_tokens", "batch_size"):
        value = getattr(config, name, 1)
        if value is not None and value < 1:  # None: the command picks (serve's batch_size)
            found.append(f"{name}: must be a positive integer, got {value}")
    for name in ("threads", "max_samples"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            found.append(f"{name}: must be a positive integer or unset, got {value}")
    return found


def _empty_problems(config, *names: str) -> list[str]:
    return [f"{name}: must not be empty" for name in names if not str(getattr(config, name)).strip()]


def _nothing_to_load(adapter, model, verb: str,
                     adapters: str = "an adapter directory") -> list[str]:
    """Neither an adapter nor a base model: the command would have nothing to load."""
    if adapter or model:
        return []
    return [f"adapter / model: give {adapters}, or a --model to {verb} bare"]


def _choice_problems(config) -> list[str]:
    return [f"{f.name}: must be one of {', '.join(f.metadata['choices'])}, "
            f"got {excerpt(getattr(config, f.name))}" for f in fields(config)
            if f.metadata.get("choices") and getattr(config, f.name) not in f.metadata["choices"]]


# The prompt formats data.templates builds: named here, where every stage reads its options.
TEMPLATES = ("chatglm1", "chatglm2", "chatglm3", "glm4", "glm45", "chat_template", "plain")


def _template_problems(config) -> list[str]:
    template = getattr(config, "template", "auto")
    if template in ("auto", *TEMPLATES):
        return []
    return [f"template: must be auto or one of {', '.join(TEMPLATES)}, got {excerpt(template)}"]


DEFAULT_VAL_FILE = "data/val_triplet.jsonl"
EVAL_TASKS = ("triplet", "generation")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class _LoadedModel(_Schema):
    """The options every command that generates with base + adapter starts with."""

    adapter: str = _same(PredictConfig, "adapter")
    model: str | None = _same(PredictConfig, "model")
    trust_remote_code: bool = _same(PredictConfig, "trust_remote_code")
    template: str = _same(PredictConfig, "template")
    show_thinking: bool = _same(PredictConfig, "show_thinking")
    long_prompt: str = _same(PredictConfig, "long_prompt")

    def predict_config(self) -> PredictConfig:
        """The generation settings as a PredictConfig (subclasses add max_new_tokens, bf16, threads)."""
        return PredictConfig(adapter=self.adapter, model=self.model,
                             trust_remote_code=self.trust_remote_code, template=self.template,
                             show_thinking=self.show_thinking,
                             max_new_tokens=self.max_new_tokens, bf16=self.bf16,
                             threads=self.threads, long_prompt=self.long_prompt)


@dataclass
class EvalConfig(_LoadedModel):
    """Scoring an adapter (and optionally its bare base model) on held-out prompt/response rows."""

    task: str = _opt("what to score: triplet (precision / recall / F1 of extracted triplets) or "
                     "generation (ROUGE-1/2/L and BLEU-4 of the answers)",
                     choices=EVAL_TASKS, default="triplet")
    data: str = _opt("evaluation rows with reference answers (.jsonl, .json, .csv, .xlsx or "
                     ".parquet in any conversation format `glmtune train` reads)",
                     make="EVAL_DATA", default=DEFAULT_VAL_FILE)
    encoding: str = _same(TrainConfig, "encoding")
    output_dir: str | None = _opt("where predictions.jsonl, report.txt and metrics.json go "
                                  "(default: <adapter>/eval, or data/output/eval for a bare model)",
                                  make="EVAL_DIR")
    compare_base: bool = _opt("also evaluate the base model without the adapter and show both "
                              "side by side", default=False)
    max_samples: int | None = _opt("evaluate only the first N rows", make="EVAL_SAMPLES")
    batch_size: int = _opt("prompts generated together (left-padded; more is faster but uses "
                           "more memory)", make="EVAL_BATCH_SIZE", default=8)
    max_new_tokens: int = _same(PredictConfig, "max_new_tokens")
    bf16: str = _same(PredictConfig, "bf16")
    threads: int | None = _same(PredictConfig, "threads")

    def _checks(self) -> list[str]:
        found = _inference_problems(self) + _empty_problems(self, "data")
        found += _nothing_to_load(self.adapter, self.model, "score")
        if self.compare_base and not self.adapter:
            found.append("compare_base: needs an adapter to compare the base model with")
        return found


    @property
    def resolved_output_dir(self) -> str:
        if self.output_dir:
            return self.output_dir
        return str(Path(self.adapter) / "eval") if self.adapter else "data/output/eval"


@dataclass
class ChatConfig(_LoadedModel):
    """An interactive conversation with a base model plus adapter."""

    max_new_tokens: int = _same(PredictConfig, "max_new_tokens", default=256)
    bf16: str = _same(PredictConfig, "bf16")
    threads: int | None = _same(PredictConfig, "threads")

    def _checks(self) -> list[str]:
        return _inference_problems(self) + _nothing_to_load(self.adapter, self.model, "chat")



@dataclass
class ExportConfig(_Schema):
    """Merging an adapter into its base model and saving a standalone model."""

    adapter: str = _opt("adapter directory written by `glmtune train`", make="ADAPTER",
                        default=DEFAULT_OUTPUT_DIR)
    model: str | None = _same(PredictConfig, "model")
    trust_remote_code: bool = _same(PredictConfig, "trust_remote_code")
    out: str | None = _opt("directory for the merged model (default: <adapter>-merged)",
                           make="EXPORT_DIR")
    overwrite: bool = _opt("replace a non-empty --out", make="OVERWRITE", default=False)
    dtype: str = _opt("precision of the saved weights: auto (the base's own, from its "
                      "config.json; float32 when it names none), float32, bfloat16 or float16 "
                      "(the merge and its check run in float32)",
                      make="EXPORT_DTYPE", choices=EXPORT_DTYPES, default="auto")
    threads: int | None = _same(PredictConfig, "threads")

    def _checks(self) -> list[str]:
        found = _inference_problems(self)
        if not self.adapter.strip():
            found.append("adapter: must not be empty: export merges an adapter into its base")
        return found


    @property
    def resolved_out(self) -> str:
        return self.out or str(self.adapter).rstrip("/\\") + "-merged"


@dataclass
class ServeConfig(_LoadedModel):
    """An OpenAI-compatible HTTP API over a base model and its adapters."""

    adapter: str = _same(PredictConfig, "adapter", help=(
        "adapter directories to serve, comma-separated; each is a model named after its "
        "directory (NAME=DIR names it); the bare base is served too ('' serves only the base)"))
    host: str = _opt("address to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                     "network the machine is on)", make="SERVE_HOST", default="127.0.0.1")
    port: int = _opt("TCP port", make="PORT", default=8000)
    api_key: str | None = _opt("require `Authorization: Bearer KEY` on every endpoint but "
                               "/health (default: the GLMTUNE_API_KEY environment variable; "
                               "neither: no key needed; the variable keeps the key out of "
                               "the process list)", make="GLMTUNE_API_KEY")
    queue_size: int = _opt("requests that may wait for the model; more are answered 429 with "
                           "Retry-After", make="QUEUE_SIZE", default=32)
    batch_size: int | None = _opt("greedy requests for the same model generated together "
                                  "(default: 8 in float32, 1 under bf16, where a batched "
                                  "answer can differ from the same request alone at a "
                                  "near-tie; 1: one at a time)", make="SERVE_BATCH_SIZE")
    max_new_tokens: int = _same(PredictConfig, "max_new_tokens", help=(
        "longest answer in tokens when a request gives no max_tokens"), default=256)
    log_prompts: bool = _opt("log each request's messages and answer (off: only sizes and "
                             "timings are logged)", make="LOG_PROMPTS", default=False)
    quant: str = _same(PredictConfig, "quant")
    bf16: str = _same(PredictConfig, "bf16")
    threads: int | None = _same(PredictConfig, "threads")

    def _checks(self) -> list[str]:
        found = _inference_problems(self)
        if self.queue_size < 1:
            found.append(f"queue_size: must be a positive integer, got {self.queue_size}")
        if not 1 <= self.port <= 65535:
            found.append(f"port: must be in 1..65535, got {self.port}")
        found += _empty_problems(self, "host")
        names = [name for name, _ in self.adapters]
        for name in sorted({n for n in names if names.count(n) > 1}):
            found.append(f"adapter: two adapters are served as {name!r}; name them: NAME=DIR")
        return found + _nothing_to_load(self.adapters, self.model, "serve", "adapter directories")


    @property
    def adapters(self) -> list[tuple[str, str]]:
        """(served model name, directory) of each adapter, in the order given."""
        found = []
        for item in (part.strip() for part in self.adapter.split(",")):
            if item:
                name, sep, path = item.partition("=")
                name, path = (name, path.strip()) if sep else ("", item)
                found.append((name.strip() or Path(path.rstrip("/\\")).name, path))
        return found


# --------------------------------------------------------------------------
# Deriving front ends from the schema
# --------------------------------------------------------------------------

def field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return hint, False


def cli_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def make_variables(cls: type) -> dict[str, str]:
    """Make variable name -> config field name."""
    return {f.metadata["make"]: f.name for f in fields(cls) if f.metadata.get("make")}


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def coerce(cls: type, name: str, value: Any, source: str) -> tuple[Any, str | None]:
    """Convert a YAML / environment / CLI value to the field's type.

    Returns (value, problem); the problem is collected rather than raised so
    that one error can list everything that is wrong.
    """
    f = {f.name: f for f in fields(cls)}[name]
    base, optional = field_type(cls, f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None, None
        return value, f"{name}: a value is required ({source})"
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value, None
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE, None
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value), None
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value), None
        if isinstance(value, (dict, list)):
            raise ValueError
        if isinstance(value, bool):  # YAML `bf16: true` means the choice "true"
            return ("true" if value else "false"), None
        return str(value), None
    except (TypeError, ValueError):
        return value, f"{name}: expected {expected}, got {excerpt(value)} ({source})"


def load_yaml(path: str | os.PathLike, cls: type = None) -> dict[str, Any]:
    """Read a YAML config file into field values, reporting every bad key at once."""
    import yaml

    from glmtune.errors import GlmtuneError

    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: config file not found")
    try:
        raw = _safe_yaml(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as exc:
        raise GlmtuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise GlmtuneError(f"{path}: YAML nested too deeply (expected a flat mapping of "
                           "config keys)") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise GlmtuneError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GlmtuneError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return _collect(cls or TrainConfig, raw, f"in {path}")


# Keys people bring from HF TrainingArguments and LLaMA-Factory configs, read as ours.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "cutoff_len": "max_seq_len", "lora_rank": "lora_r",
    "lora_target": "target_modules", "model_name_or_path": "model", "max_source_length": "max_seq_len",
}


MAX_YAML_NODES = 10_000  # a config has ~60 keys; aliases must not expand past this


def _safe_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans and a bound on alias expansion.

    YAML 1.1 reads yes/no/on/off as booleans, so ``template: no`` became False and was
    reported as 'false'; here only true/false are booleans and the rest stay as written
    (``coerce`` still reads yes/no for boolean fields). Aliases can multiply a 1 KB file
    into gigabytes ("billion laughs"): the composed document is measured, expanded,
    before anything is built from it.
    """
    import re

    import yaml

    from glmtune.errors import GlmtuneError

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise GlmtuneError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES} "
                               "values (an alias bomb?); expected a plain mapping of config keys")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root) -> float:
    """Nodes in the document with every alias expanded, counted without expanding it."""
    import yaml

    sizes: dict[int, float] = {}
    pending = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if id(node) in sizes and not children_done:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), float("inf")) for c in children)
            continue
        sizes[id(node)] = float("inf")  # in progress: a cycle through it is infinite
        pending.append((node, True))
        pending.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _collect(cls: type, raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Field values from a YAML mapping; every unknown key, wrong type and bad value in one error."""
    import logging

    known = {f.name for f in fields(cls)}
    values, found, given = {}, [], {}
    for key, value in raw.items():
        name = ALIASES.get(str(key), key) if key not in known else key
        if name not in known:
            hint = _closest(str(key)[:100], known)
            shown = str(key) if len(str(key)) <= 80 else excerpt(key)
            found.append(f"{shown}: unknown key ({source})"
                         + (f"; did you mean '{hint}'?" if hint else ""))
            continue
        if name in given:  # an alias and our own name, in either order
            found.append(f"{key}: sets {name} again (also set as '{given[name]}') ({source})")
            continue
        if name != key:
            logging.getLogger("glmtune").info("%s: read '%s' as '%s'", source, key, name)
        given[name] = key
        values[name], problem = coerce(cls, name, value, source)
        if problem:
            found.append(problem)
            del values[name]
    if found:
        # the values that did parse are checked too, so one run shows every problem
        try:
            found += [f"{p} ({source})" for p in cls(**values).problems()]
        except TypeError:  # a config whose fields cannot be built without the bad ones
            pass
        raise ConfigError(found, source.removeprefix("in "))
    return _Layer(values, source)


class _Layer(dict):
    """Field values that remember where they came from, so a problem found later (in
    ``problems()``) still names the file or flag they were written in."""

    def __init__(self, values: dict[str, Any], source: str):
        super().__init__(values)
        self.source = source


def _closest(word: str, candidates) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(candidates), n=1)
    return match[0] if match else None


def from_make_environment(cls: type, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Field values from Make variables (exported by make into the recipe's environment)."""
    environ = os.environ if environ is None else environ
    raw = {name: environ[var] for var, name in make_variables(cls).items()
           if environ.get(var, "") != ""}
    return _collect(cls, raw, "from Make variables")


def build_config(cls: type, *layers: dict[str, Any]):
    """Defaults overridden by each layer in turn, then validated."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        merged.update(layer)
        for name in layer:
            if isinstance(layer, _Layer):
                origin[name] = layer.source
            else:
                origin.pop(name, None)
    config = cls(**merged)
    found = config.problems()
    if found:
        # each problem starts with its field's name: say where that value came from
        raise ConfigError([p + (f" ({origin[p.split(':')[0]]})"
                                if p.split(":")[0] in origin and origin[p.split(":")[0]] not in p
                                else "") for p in found])
    return config


def save_yaml(config, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False),
                          encoding="utf-8")
