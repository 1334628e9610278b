"""bitsandbytes layers on a CPU, dequantized and multiplied a block of rows at a time.

On a CPU, bitsandbytes turns a whole 4-bit weight (8-bit in training) back into the
compute dtype before every matmul: the forward, the checkpointed recomputation and the
backward. ChatGLM3-6B's 4096 x 27392 MLP weight is 449 MB of float32, written to fresh
pages three times a step. That costs more than the matmul it feeds (measured on a 2-core
AVX2 EPYC, 128 tokens: dequantize 187 ms, multiply 276 ms), and two such copies sat in the
training peak. Dequantized 2 M parameters at a time, a block stays in cache until the
matmul reads it: the same layer takes 262-281 ms, the matmul's own time, and holds one
block (bitsandbytes' CPU kernel dequantizes 3.2 G parameters/s into cache, 0.63 into fresh
memory).

The weights, their format, and what PEFT, merging and saving see stay bitsandbytes' own;
the outputs are the same sums in another order. ``install`` swaps the class of each
bitsandbytes layer for a subclass whose CPU forward does this; on other devices, and for
8-bit layers outside training (bitsandbytes then runs its int8 matmul), it calls
bitsandbytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import lru_cache

import torch

# measured: 2 M float32 parameters (8 MB) per block ran at the matmul's speed, 8 M did not
BLOCK_PARAMS = 1 << 21

Blocks = Callable[[torch.dtype], Iterator[tuple[int, int, torch.Tensor]]]


def row_blocks(rows: int, cols: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of about BLOCK_PARAMS parameters, each starting on a multiple of ``align``
    parameters (a quantization block boundary)."""
    unit = align // math.gcd(cols, align)  # rows per aligned start
    step = max(unit, BLOCK_PARAMS // max(cols, 1) // unit * unit)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


class _BlockwiseMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized W, W dequantized a block of rows at a time in both
    directions; nothing is saved for the backward but the way to read W."""

    @staticmethod
    def forward(ctx, x, blocks: Blocks, out_features: int):
        ctx.blocks = blocks
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], out_features)
        for start, end, weight in blocks(x.dtype):
            out[:, start:end] = flat @ weight.t()
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        for start, end, weight in ctx.blocks(grad.dtype):
            part = grad[:, start:end]
            grad_x = part @ weight if grad_x is None else grad_x.addmm_(part, weight)
        return grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]), None, None


def nf4_blocks(weight) -> Blocks:
    """Blocks of a bitsandbytes ``Params4bit`` (nf4 or fp4, double-quantized or not)."""
    import bitsandbytes.functional as bnb

    state = weight.quant_state
    rows, cols = state.shape

    def blocks(dtype):
        absmax = state.absmax
        if state.nested:
            absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
        absmax = absmax.float()
        packed = weight.data.view(torch.uint8).reshape(-1)  # rows x cols nibbles, row-major
        for start, end in row_blocks(rows, cols, state.blocksize):
            first, last = start * cols, end * cols
            yield start, end, torch.ops.bitsandbytes.dequantize_4bit.default(
                packed[first // 2:(last + 1) // 2],
                absmax[first // state.blocksize:-(-last // state.blocksize)],
                state.blocksize, state.quant_type, (end - start, cols), dtype)

    return blocks


def int8_blocks(cb: torch.Tensor, scb: torch.Tensor) -> Blocks:
    """Blocks of an LLM.int8 weight: int8 rows and one absmax per row (W = CB * SCB / 127)."""
    def blocks(dtype):
        for start, end in row_blocks(*cb.shape):
            yield start, end, cb[start:end].to(dtype).mul_(scb[start:end, None].to(dtype) / 127.0)

    return blocks


def _linear(layer, x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """``layer``'s x W^T + b with W read from ``blocks``."""
    out = _BlockwiseMatmul.apply(x, blocks, layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


@lru_cache(maxsize=1)
def _classes() -> dict[type, type]:
    """bitsandbytes layer class -> its blockwise subclass (built on first use: bitsandbytes
    is optional)."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    class BlockwiseLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x):
            if x.device.type != "cpu":
                return super().forward(x)
            fix_4bit_weight_quant_state_from_module(self)
            if not self.compute_type_is_set:
                self.set_compute_type(x)
                self.compute_type_is_set = True
            dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            return _linear(self, x, nf4_blocks(self.weight)).to(dtype)

    class BlockwiseLinear8bitLt(bnb.nn.Linear8bitLt):
        def forward(self, x):
            cb = self.weight.CB if self.weight.CB is not None else self.state.CB
            scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
            if (x.device.type != "cpu" or not self.training or cb is None or scb is None
                    or self.state.has_fp16_weights):
                return super().forward(x)
            return _linear(self, x, int8_blocks(cb, scb))

    return {bnb.nn.Linear4bit: BlockwiseLinear4bit, bnb.nn.Linear8bitLt: BlockwiseLinear8bitLt}


def install(model) -> int:
    """Give every bitsandbytes 4-bit / 8-bit layer of ``model`` the blockwise CPU forward;
    the number of layers changed. Also turns off bitsandbytes' CPU repacking of nf4
    weights: it runs on an eval-mode forward on AVX512-BF16 CPUs, fails for in_features
    not a multiple of 64 and breaks any later backward."""
    try:
        classes = _classes()
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        blockwise = classes.get(type(module))
        if blockwise is not None:
            module.__class__ = blockwise
            changed += 1
    return changed
