"""Predict a run's peak memory before loading anything.

The prediction is built from the model's config.json (parameter counts by
kind), the quantization and dtype, the LoRA shape, the batch geometry,
gradient checkpointing and the optimizer, plus two transient costs people
forget: the checkpoint shard being read during loading, and the logits of a
large vocabulary. Constants marked "measured" were fitted with
``make bench-memory`` on the machine named in bench/README.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.hardware import GB

# bytes per parameter of a quantized Linear weight, quantization state included
_QUANT_BYTES = {"4bit": 0.5 + 4 / 64 / 8 * 1.0 + 0.03, "8bit": 1.0 + 4 / 4096}
# measured: RSS of a training process besides model and data (torch, transformers,
# peft imported: 0.38 GB; then oneDNN kernels, thread pools, the optimizer)
RUNTIME_BYTES = 0.5 * GB
# measured: bitsandbytes and its CPU kernels loaded
QUANT_RUNTIME_BYTES = 0.2 * GB
# measured: peak while one tensor is quantized, in units of that tensor's checkpoint size
QUANT_LOAD_FACTOR = 3
# measured: activation bytes kept per token per layer, in units of the hidden and
# intermediate sizes (without checkpointing: q/k/v/o, MLP inputs, norms, autocast copies)
_ACT_PER_HIDDEN = 16
_ACT_PER_INTERMEDIATE = 5


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from config.json of any family."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False

    @property
    def linear_params(self) -> int:
        """Parameters in the transformer blocks' Linear layers (what LoRA and quantization touch)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down
        return self.layers * (q + kv + o + mlp)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params

    def lora_params(self, rank: int) -> int:
        """LoRA A+B over all attention and MLP projections (the default targets)."""
        q_out, kv_out = self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim
        per_layer = rank * ((self.hidden + q_out + kv_out)      # fused or separate q/k/v
                            + (q_out + self.hidden)                # o
                            + (self.hidden + 2 * self.intermediate)  # gate_up
                            + (self.intermediate + self.hidden))   # down
        return self.layers * per_layer


def _get(config: dict[str, Any], *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise KeyError(names[0])
    return default


def shape_from_config(config: dict[str, Any]) -> Shape:
    """Native transformers names first, then ChatGLM's remote-code names."""
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _get(config, "head_dim", "kv_channels", default=hidden // heads)
    kv_heads = _get(config, "num_key_value_heads", "multi_query_group_num", default=heads)
    if config.get("model_type") == "chatglm" and not config.get("multi_query_attention", True):
        kv_heads = heads
    return Shape(
        hidden=hidden, layers=_get(config, "num_hidden_layers", "num_layers", "n_layer"),
        intermediate=_get(config, "intermediate_size", "ffn_hidden_size", "inner_hidden_size",
                          default=4 * hidden),
        vocab=_get(config, "padded_vocab_size", "vocab_size"), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, tied_embeddings=bool(config.get("tie_word_embeddings", False)))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _largest_tensor(file: Path) -> int:
    """Bytes of the biggest tensor in a safetensors file, from its header alone."""
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    sizes = [_DTYPE_BYTES.get(t["dtype"], 4) * _numel(t["shape"])
             for name, t in header.items() if name != "__metadata__"]
    return max(sizes, default=0)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def largest_shard_bytes(model_dir: str | Path) -> int:
    """What loading holds in memory besides the model itself.

    Shards are read tensor by tensor (``load.streaming_safetensors``), so for
    safetensors it is the biggest tensor; a pickled ``.bin`` is read whole.
    """
    path = Path(model_dir)
    files = list(path.glob("*.safetensors"))
    if files:
        try:
            return max(_largest_tensor(f) for f in files)
        except (OSError, ValueError, KeyError):
            pass
    files = files or list(path.glob("*.bin"))
    return max((f.stat().st_size for f in files), default=0)


@dataclass(frozen=True)
class Settings:
    quant: str = "none"          # none | 4bit | 8bit
    base_dtype: str = "float32"  # of unquantized weights
    lora_r: int = 8
    train_embeddings: bool = False
    batch_size: int = 1
    seq_len: int = 256
    gradient_checkpointing: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class Estimate:
    weights: int
    trainable: int
    activations: int
    logits: int
    runtime: int
    load_transient: int

    @property
    def train_peak(self) -> int:
        return self.runtime + self.weights + self.trainable + self.activations + self.logits

    @property
    def load_peak(self) -> int:
        return self.runtime + self.weights + self.load_transient

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)

    def breakdown(self) -> dict[str, float]:
        return {name: round(getattr(self, name) / GB, 3) for name in
                ("weights", "trainable", "activations", "logits", "runtime", "load_transient")} | {
            "peak": round(self.peak / GB, 3)}


def estimate(shape: Shape, s: Settings, shard_bytes: int = 0) -> Estimate:
    dtype_bytes = 2 if s.base_dtype == "bfloat16" else 4
    linear = (shape.linear_params * dtype_bytes if s.quant == "none"
              else int(shape.linear_params * _QUANT_BYTES[s.quant]))
    weights = linear + shape.embedding_params * dtype_bytes  # embeddings/head stay unquantized
    # fp32 value + grad + two AdamW moments
    trainable = 16 * shape.lora_params(s.lora_r)
    if s.train_embeddings:
        trainable += 16 * shape.embedding_params
    tokens = s.batch_size * s.seq_len
    per_token_layer = 2 * (_ACT_PER_HIDDEN * shape.hidden + _ACT_PER_INTERMEDIATE * shape.intermediate)
    attention = 2 * s.batch_size * shape.heads * s.seq_len * s.seq_len * 2  # scores + probs, bf16
    if s.gradient_checkpointing:
        # layer inputs kept for every layer, one layer recomputed at a time
        activations = shape.layers * tokens * shape.hidden * 4 + tokens * per_token_layer + attention
    else:
        activations = shape.layers * (tokens * per_token_layer + attention)
    logits = tokens * shape.vocab * (2 + 4 + 4)  # bf16 logits, fp32 copy for the loss, its grad
    if s.device == "cpu":
        runtime = RUNTIME_BYTES + (QUANT_RUNTIME_BYTES if s.quant != "none" else 0)
        # quantizing a tensor holds it as read, as float32 and quantized at once
        transient = shard_bytes * (QUANT_LOAD_FACTOR if s.quant != "none" else 1)
    else:
        runtime, transient = int(0.5 * GB), 0  # CUDA context and allocator slack
    return Estimate(weights=weights, trainable=trainable, activations=activations, logits=logits,
                    runtime=int(runtime), load_transient=int(transient))

