"""Predict how long a training step takes, before loading anything.

A LoRA step on a frozen base is mostly the base's matrix multiplications: the
forward pass, the gradient with respect to each layer's input (frozen weights
get no gradient of their own) and, with gradient checkpointing, the forward
again. So the prediction is those multiplications' floating-point operations
divided by the rate this machine reaches *at the run's own matrix shapes*,
measured here in a fraction of a second (small matrices run far below the
peak), plus what is not a matrix multiplication:

- quantized bases dequantize every weight once per pass, a block of rows at a
  time (``model.blockwise``; measured too);
- elementwise work (norms, rotary, activations, residuals, casts), proportional
  to tokens × hidden size × layers;
- a fixed cost per layer and pass (operator dispatch, autograd), which is what
  small models are made of.

The last two constants are fitted (``make bench-memory``, the default job); the
rest is measured. ``train`` replaces the prediction by the measured step time
after its first steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

from glmtune.plan.estimate import Settings, Shape

# fitted: elementwise work per token, layer and pass (norms, rotary, activations, residuals,
# softmax, casts, their gradients), in units of one addition over hidden + intermediate
# elements, timed here (tiny-glm and GLM-241M on a 2-core AVX2 EPYC)
_ELEMENTWISE_PASSES = 110
# fitted: fixed seconds per layer and pass (operator dispatch, autograd records)
_LAYER_OVERHEAD_S = 0.3e-3
# fitted: fixed seconds per optimizer step (data, logging, the optimizer's kernel launches)
_STEP_OVERHEAD_S = 5e-3


@dataclass(frozen=True)
class StepTime:
    matmul: float     # seconds: frozen-base and head multiplications, attention
    dequant: float    # seconds: quantized weights turned back into the compute dtype
    other: float      # seconds: elementwise work and fixed costs
    tokens: int       # tokens per optimizer step the prediction is for

    @property
    def seconds(self) -> float:
        return self.matmul + self.dequant + self.other

    def describe(self, steps: int | None = None) -> str:
        text = (f"{self.seconds:.2f} s/step (matmul {self.matmul:.2f}, dequantize {self.dequant:.2f}, "
                f"other {self.other:.2f}; {self.tokens / max(self.seconds, 1e-9):.0f} tokens/s)")
        if steps:
            text += f", {steps} steps ≈ {format_duration(self.seconds * steps)}"
        return text


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _best_time(fn, budget_s: float = 0.2, at_least: int = 2, at_most: int = 200) -> float:
    """The fastest of repeated calls: at least ``at_least``, then more while ``budget_s``
    lasts. Small operations need many: the first few after a pause wake the thread pool
    (measured: tiny-glm's shapes timed cold predicted its step 70 % too slow)."""
    fn()  # first call: kernels chosen, memory touched
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for done in range(at_most):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
        if done + 1 >= at_least and time.perf_counter() > deadline:
            break
    return best


@lru_cache(maxsize=32)
def matmul_rate(tokens: int, k: int, n: int, dtype: str, device: str = "cpu") -> float:
    """FLOP/s of ``[tokens, k] @ [k, n]`` in ``dtype`` here, now (cached per shape).

    ``tokens`` and ``n`` are capped so measuring a 6B model's widest layer allocates
    tens of MB and takes a fraction of a second; the rate hardly changes beyond.
    """
    import torch

    tokens, n = min(tokens, 1024), min(n, max(256, (8 << 20) // max(k, 1)))
    kind = getattr(torch, dtype)
    x = torch.randn(tokens, k, dtype=kind, device=device)
    w = torch.randn(n, k, dtype=kind, device=device)

    def run():
        torch.nn.functional.linear(x, w)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * tokens * k * n / _best_time(run)


@lru_cache(maxsize=4)
def add_seconds_per_element(dtype: str) -> float:
    """Seconds per element of an addition of 1 MB tensors: this machine's elementwise speed.

    One size for every model: the fitted constant below absorbs how far a model's own
    tensors fall out of cache (measured: the same ~10 ns per token, layer, pass and
    hidden + intermediate unit on tiny-glm and GLM-241M)."""
    import torch

    kind = getattr(torch, dtype)
    x, y, out = (torch.randn(256, 1024, dtype=kind) for _ in range(3))
    # into a kept tensor: a fresh output would time the page faults of its allocation
    return _best_time(lambda: torch.add(x, y, out=out)) / x.numel()


@lru_cache(maxsize=4)
def dequant_rate(quant: str, dtype: str) -> float:
    """Parameters per second a CPU training step dequantizes here (0 without bitsandbytes).

    Timed through ``model.blockwise`` on one block of rows, which is what a step does to
    every weight: the block stays in cache (measured, AVX2 EPYC: 3.2 G parameters/s, where
    dequantizing a whole 16 M-parameter weight into fresh memory ran at 0.63)."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return 0.0
    from glmtune.model import blockwise

    cols = 4096
    rows = blockwise.BLOCK_PARAMS // cols
    weight = torch.randn(rows, cols)
    kind = getattr(torch, dtype)
    if quant == "8bit":
        int8 = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        blocks = blockwise.int8_blocks(int8.CB, int8.SCB)
    else:
        blocks = blockwise.nf4_blocks(bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu"))
    return weight.numel() / _best_time(lambda: [block for *_, block in blocks(kind)])


def _block_seconds(shape: Shape, tokens: int, dtype: str, attn_rate: float,
                   mlp_rate: float) -> float:
    """One pass over the decoder layers' weights for ``tokens`` tokens.

    A routed expert sees only its share of the tokens (``tokens`` x experts per token /
    experts: 16 of 256 on GLM-4.7-Flash's layers), where a matmul runs far below the rate
    of the whole batch; it is measured at that size."""
    h = shape.hidden
    attention = shape.layers * shape.attention_params
    seconds = 2 * tokens * attention / attn_rate
    seconds += 2 * tokens * shape.dense_layers * shape._dense_mlp_params / mlp_rate
    if shape.moe_layers:
        shared = shape.moe_intermediate * shape.shared_experts
        if shared:
            seconds += (2 * tokens * shape.moe_layers * 3 * h * shared
                        / matmul_rate(tokens, h, shared, dtype))
        per_expert = max(1, tokens * shape.experts_per_token // max(shape.experts, 1))
        routed = shape.moe_layers * shape.experts_per_token * 3 * h * shape.moe_intermediate
        seconds += 2 * tokens * routed / matmul_rate(per_expert, h, shape.moe_intermediate, dtype)
    return seconds


def step_time(shape: Shape, s: Settings, *, tokens: int, seq_len: int, micro_batches: int = 1,
              compute_dtype: str = "float32") -> StepTime:
    """Seconds of one optimizer step of ``micro_batches`` passes of ``tokens`` tokens each
    (sequences of ``seq_len``), on a CPU, with the fast path."""
    passes = 3 if s.gradient_checkpointing else 2  # forward, input gradient, recompute
    h = shape.hidden
    # one token's multiply-adds in the blocks: attention projections and the MLP that runs
    head_flops = 2 * tokens * shape.vocab * h  # only trained positions reach it; bounded by all
    attention_flops = 4 * tokens * seq_len * shape.heads * shape.head_dim * shape.layers
    lora_flops = 6 * tokens * shape.lora_params(s.lora_r, s.lora_experts)

    mlp_rate = matmul_rate(tokens, h, shape.intermediate or h, compute_dtype)
    attn_rate = matmul_rate(tokens, h, shape.heads * shape.head_dim, compute_dtype)
    head_passes = 3 if s.train_embeddings else 2  # + the head's own weight gradient
    matmul = (passes * _block_seconds(shape, tokens, compute_dtype, attn_rate, mlp_rate)
              + head_passes * head_flops / mlp_rate
              + (passes + 1) * attention_flops / attn_rate + lora_flops / attn_rate)

    dequant = 0.0
    if s.quant != "none":
        rate = dequant_rate(s.quant, compute_dtype)
        dequant = passes * shape.linear_params / rate if rate else 0.0

    width = h + shape.active_intermediate // max(shape.layers, 1)
    elementwise = (_ELEMENTWISE_PASSES * add_seconds_per_element(compute_dtype)
                   * tokens * width * shape.layers * passes)
    fixed = _LAYER_OVERHEAD_S * shape.layers * passes
    other = micro_batches * (elementwise + fixed) + _STEP_OVERHEAD_S
    return StepTime(matmul=micro_batches * matmul, dequant=micro_batches * dequant, other=other,
                    tokens=tokens * micro_batches)
