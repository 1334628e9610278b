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

from glmtune.plan.hardware import GB

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
    """What memory depends on, read from config.json of any family.

    Mixture-of-experts models (GLM-4.5 ... 4.7, GLM-4.7-Flash) add ``moe_layers`` layers
    whose MLP is ``experts`` routed experts of ``moe_intermediate`` each, ``experts_per_token``
    of them run per token, plus ``shared_experts`` that always run. GLM-4.7-Flash's
    multi-head latent attention (MLA) adds the low ranks ``q_lora_rank`` / ``kv_lora_rank``.
    ChatGLM-6B (v1) has a GELU MLP (``gated_mlp`` false): two matrices, not three.
    """

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    moe_layers: int = 0
    experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    moe_intermediate: int = 0
    q_lora_rank: int = 0   # MLA; 0 with kv_lora_rank set: a full-rank q_proj
    kv_lora_rank: int = 0  # MLA when > 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    gated_mlp: bool = True  # gate, up and down projections; False: up and down only
    # How the Linear layers LoRA adapts are cut (each gets its own A and B):
    fused_qkv: bool = False     # one query_key_value (ChatGLM-6B), not q_proj / k_proj / v_proj
    fused_gate_up: bool = True  # one gate_up_proj (GLM, GLM-4, ChatGLM2/3), not gate / up_proj

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def _dense_mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention projections."""
        return sum(i * o for i, o in self._attention_outputs())

    def _attention_outputs(self) -> list[tuple[int, int]]:
        """(in, out) of each attention projection of one layer."""
        h = self.hidden
        if not self.kv_lora_rank:
            q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h)]
        qk = self.head_dim + self.qk_rope_dim  # MLA: head_dim holds the no-rope part
        q = ([(h, self.q_lora_rank), (self.q_lora_rank, self.heads * qk)] if self.q_lora_rank
             else [(h, self.heads * qk)])
        return q + [(h, self.kv_lora_rank + self.qk_rope_dim),
                    (self.kv_lora_rank, self.heads * (self.head_dim + self.v_head_dim)),
                    (self.heads * self.v_head_dim, h)]

    @property
    def _shared_intermediate(self) -> int:
        return self.moe_intermediate * self.shared_experts

    @property
    def linear_params(self) -> int:
        """Parameters in the transformer blocks' Linear layers (what LoRA and quantization touch):
        attention, dense MLPs (gate, up, down) and shared experts. Routed experts are 3-D
        parameters, not Linear layers: see expert_params."""
        attention = self.attention_params
        return (self.layers * attention + self.dense_layers * self._dense_mlp_params
                + self.moe_layers * 3 * self.hidden * self._shared_intermediate)

    @property
    def expert_params(self) -> int:
        """Routed experts and routers: all resident, whichever few run per token."""
        per_layer = self.experts * 3 * self.hidden * self.moe_intermediate + self.experts * self.hidden
        return self.moe_layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.expert_params + self.embedding_params

    def lora_params(self, rank: int, experts: bool = False) -> int:
        """LoRA A+B over attention, dense MLP and shared experts (the default targets), and
        with ``experts`` the routed experts' fused weights (rank per expert, as PEFT does)."""
        if self.fused_qkv:  # one A reads the input for q, k and v
            q_out, kv_out = self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim
            attention = (self.hidden + q_out + kv_out) + (q_out + self.hidden)
        else:
            attention = sum(i + o for i, o in self._attention_outputs())

        def mlp(inter: int, gated: bool = True, fused: bool = self.fused_gate_up) -> int:
            if not gated:  # up, down
                return 2 * (self.hidden + inter)
            if fused:  # gate_up, down
                return (self.hidden + 2 * inter) + (inter + self.hidden)
            return 3 * (self.hidden + inter)  # gate, up, down

        total = (self.layers * attention + self.dense_layers * mlp(self.intermediate, self.gated_mlp)
                 + self.moe_layers * mlp(self._shared_intermediate))
        if experts:  # the routed experts' weights are fused gate_up and down in every MoE GLM
            total += self.moe_layers * self.experts * mlp(self.moe_intermediate, fused=True)
        return rank * total

    @property
    def active_intermediate(self) -> int:
        """MLP width summed over layers that one token activates (all of it in dense layers)."""
        moe = self.moe_intermediate * (self.experts_per_token + self.shared_experts)
        return self.dense_layers * self.intermediate + self.moe_layers * moe

    def largest_linear_params(self) -> int:
        """The biggest Linear weight in the blocks (MoE models: separate gate / up projections)."""
        mlp = [self.hidden * self.intermediate] if self.dense_layers else []
        if self.moe_layers:
            mlp.append(self.hidden * self._shared_intermediate)
        return max([i * o for i, o in self._attention_outputs()] + mlp)

    def largest_tensor_params(self) -> int:
        """The biggest single tensor: an embedding matrix, or one layer's fused experts."""
        experts = self.experts * 2 * self.moe_intermediate * self.hidden if self.moe_layers else 0
        return max(self.vocab * self.hidden, experts, self.largest_linear_params())

    def layer_weight_params(self) -> int:
        """Parameters of the largest decoder layer: what FSDP / ZeRO-3 gather at once."""
        attention = self.attention_params
        dense = self._dense_mlp_params if self.dense_layers else 0
        moe = (3 * self.hidden * (self._shared_intermediate + self.experts * self.moe_intermediate)
               + self.experts * self.hidden  # the router, gathered with the layer
               if self.moe_layers else 0)
        return attention + max(dense, moe)


def _get(config: dict[str, Any], *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise KeyError(names[0])
    return default


def _moe_layers(config: dict[str, Any], layers: int) -> int:
    if not config.get("n_routed_experts") and not config.get("num_local_experts"):
        return 0
    kinds = config.get("mlp_layer_types")
    if kinds:
        return sum(kind == "sparse" for kind in kinds)
    return layers - int(config.get("first_k_dense_replace", 0))


def _chatglm1(config: dict[str, Any]) -> bool:
    """ChatGLM-6B's config.json (as glmtune.model.chatglm.detect tells, which plan/ does not
    import): ``position_encoding_2d``, or older still, neither of the v2 keys."""
    return config.get("model_type") == "chatglm" and (
        "position_encoding_2d" in config
        or not ("multi_query_attention" in config or "kv_channels" in config))


def shape_from_config(config: dict[str, Any]) -> Shape:
    """Native transformers names first, then ChatGLM's remote-code names."""
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _get(config, "head_dim", "kv_channels", default=hidden // heads)
    kv_heads = _get(config, "num_key_value_heads", "multi_query_group_num", default=heads)
    if config.get("model_type") == "chatglm" and not config.get("multi_query_attention", True):
        kv_heads = heads
    layers = _get(config, "num_hidden_layers", "num_layers", "n_layer")
    mla = {}
    if config.get("kv_lora_rank"):
        mla = dict(q_lora_rank=int(config.get("q_lora_rank") or 0),
                   kv_lora_rank=int(config["kv_lora_rank"]),
                   qk_rope_dim=int(config.get("qk_rope_head_dim", 0)),
                   v_head_dim=int(config.get("v_head_dim", head_dim)))
        head_dim = int(config.get("qk_nope_head_dim", head_dim))
    moe_layers = _moe_layers(config, layers)
    moe = {}
    if moe_layers:
        moe = dict(moe_layers=moe_layers,
                   experts=int(_get(config, "n_routed_experts", "num_local_experts")),
                   experts_per_token=int(config.get("num_experts_per_tok", 1)),
                   shared_experts=int(config.get("n_shared_experts", 0)),
                   moe_intermediate=int(config["moe_intermediate_size"]))
    v1 = _chatglm1(config)
    return Shape(
        hidden=hidden, layers=layers,
        intermediate=_get(config, "intermediate_size", "ffn_hidden_size", "inner_hidden_size",
                          default=4 * hidden),
        vocab=_get(config, "padded_vocab_size", "vocab_size"), heads=heads, kv_heads=kv_heads,
        # ChatGLM-6B's config.json leaves tie_word_embeddings out and its model ties them
        head_dim=head_dim, tied_embeddings=bool(config.get("tie_word_embeddings", v1)),
        gated_mlp=not v1, fused_qkv=v1,
        fused_gate_up=config.get("model_type") in ("glm", "glm4", "chatglm"), **moe, **mla)


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


def pickled_only(model_dir: str | Path) -> bool:
    """The checkpoint is ``.bin`` shards only (ChatGLM-6B / 2-6B ship nothing else)."""
    path = Path(model_dir)
    return not any(path.glob("*.safetensors")) and any(path.glob("*.bin"))


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
    lora_experts: bool = False
    shards: int = 1  # processes FSDP / ZeRO-3 split the parameters and optimizer state over


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


def estimate(shape: Shape, s: Settings, shard_bytes: int = 0, pickled: bool = False) -> Estimate:
    """Peak memory of one training process (one device).

    ``pickled``: ``shard_bytes`` is a whole ``.bin`` shard, memory-mapped while its
    tensors are converted one at a time (``model.chatglm.weights``): what loading holds
    besides the model is that shard, whatever the quantization (measured: ChatGLM3-6B's
    layout at 4-bit, 0.98 GB over the loaded model with 0.96 GB shards)."""
    dtype_bytes = 2 if s.base_dtype == "bfloat16" else 4
    linear = (shape.linear_params * dtype_bytes if s.quant == "none"
              else int(shape.linear_params * _QUANT_BYTES[s.quant]))
    # Embeddings/head stay unquantized, and so do routed experts: bitsandbytes quantizes
    # Linear layers, and the experts are 3-D parameters.
    weights = linear + (shape.expert_params + shape.embedding_params) * dtype_bytes
    # fp32 value + grad + two AdamW moments
    trainable = 16 * shape.lora_params(s.lora_r, s.lora_experts)
    if s.train_embeddings:
        trainable += 16 * shape.embedding_params
    if s.shards > 1:
        # Each process keeps 1/shards of everything, plus the whole layer being computed.
        layer = shape.layer_weight_params()
        layer_bytes = (layer * dtype_bytes if s.quant == "none"
                       else int(layer * _QUANT_BYTES[s.quant]))
        weights = weights // s.shards + layer_bytes
        trainable //= s.shards
    tokens = s.batch_size * s.seq_len
    # per token: hidden-sized tensors in every layer, MLP-sized ones of the experts that run
    # bytes of a kept activation: bf16 under autocast (a bf16 base), else float32 (measured:
    # GLM-241M in fp32 on an AVX2 CPU kept 0.8 GB more than the bf16 constants predicted)
    act = 2 if s.base_dtype == "bfloat16" else 4
    hidden_part = act * _ACT_PER_HIDDEN * shape.hidden
    mlp_part = act * _ACT_PER_INTERMEDIATE * shape.active_intermediate  # summed over layers
    attention = 2 * s.batch_size * shape.heads * s.seq_len * s.seq_len * act  # scores + probs
    if s.gradient_checkpointing:
        # layer inputs kept for every layer, one layer recomputed at a time
        widest = max(shape.intermediate if shape.dense_layers else 0,
                     shape.moe_intermediate * (shape.experts_per_token + shape.shared_experts))
        activations = (shape.layers * tokens * shape.hidden * 4
                       + tokens * (hidden_part + act * _ACT_PER_INTERMEDIATE * widest) + attention)
    else:
        activations = tokens * (shape.layers * hidden_part + mlp_part) + shape.layers * attention
    if s.quant != "none" and s.device != "cpu":
        # bitsandbytes dequantizes a whole weight for each matmul, and the backward's matmul
        # reads a transposed copy: two of the widest weight at once (measured on a CPU before
        # model.blockwise: ChatGLM3-6B at 4-bit, training peaked 0.55 GB over loading, which
        # predicted it 0.9 GB under). On a CPU a block of rows is dequantized at a time.
        widest = shape.largest_linear_params() * (
            2 if shape.fused_gate_up and shape.gated_mlp and shape.dense_layers else 1)
        activations += 2 * widest * dtype_bytes
    logits = tokens * shape.vocab * (2 + 4 + 4)  # bf16 logits, fp32 copy for the loss, its grad
    if s.device == "cpu":
        runtime = RUNTIME_BYTES + (QUANT_RUNTIME_BYTES if s.quant != "none" else 0)
        # quantizing a tensor holds it as read, as float32 and quantized at once
        transient = shard_bytes * (QUANT_LOAD_FACTOR if s.quant != "none" and not pickled else 1)
        if s.quant != "none" and shape.expert_params:
            # the largest tensor is then a routed-expert weight, read but never quantized;
            # what is quantized are the Linear layers (bf16 in every GLM MoE checkpoint)
            transient = max(shard_bytes, QUANT_LOAD_FACTOR * 2 * shape.largest_linear_params())
    else:
        runtime, transient = int(0.5 * GB), 0  # CUDA context and allocator slack
    return Estimate(weights=weights, trainable=trainable, activations=activations, logits=logits,
                    runtime=int(runtime), load_transient=int(transient))
