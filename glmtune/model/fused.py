"""Fused training kernels: the fast path for LoRA on a frozen base (CPU and GPU).

What the profiler showed on a 2-core AMX CPU (GLM-241M, 4 x 256 tokens): a third of
a training step was not matrix multiplication but casts, scalings and additions
around it. PEFT's LoRA layer copies every input to float32 for its float32 adapter
and back to bf16 under autocast, multiplies the full output by the scaling and adds
it in a separate pass; the loss materialises float32 logits for every position,
prompt included; GLM's RMSNorm takes six elementwise passes forward and more back.

Each kernel here computes the same function in fewer passes, in plain PyTorch ops:

- ``LoraLinearFn``: ``x W^T + b + (x A^T)(s B)^T`` as two matmuls accumulated in
  place, with a hand-written backward (the frozen W gets no gradient).
- ``linear_cross_entropy``: the LM head and cross-entropy over the *trained*
  positions only, in token chunks, gradients computed during the forward so no
  logits outlive their chunk.
- ``rms_norm``: RMSNorm through the fused layer-norm kernel (see its docstring).
- ``attention_forward``: causal attention as batched matmuls with a hand-written
  backward, registered with transformers' attention interface.

``install`` patches a PEFT model's modules in place where the kernels apply and
leaves everything else (quantized layers, DoRA, dropout > 0, unknown norms, the routers
and routed experts of mixture-of-experts models) on the reference path. The weights, the saved adapter and inference are unchanged;
tests/model/test_fused.py holds the fast path to the reference path's loss and
gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

# Models whose head is ``logits = lm_head(hidden)`` with nothing after it (no
# soft-capping or scaling), so the head may be fused with the loss.
PLAIN_HEAD_MODEL_TYPES = {"glm", "glm4", "glm4_moe", "glm4_moe_lite", "llama", "mistral",
                          "qwen2", "qwen3"}
# RMSNorm classes computing ``weight * normalize(x)`` (not Gemma's 1 + weight).
PLAIN_RMSNORM_CLASSES = {"GlmRMSNorm", "Glm4RMSNorm", "Glm4MoeRMSNorm", "Glm4MoeLiteRMSNorm",
                         "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
ROW_MULTIPLE = 64  # trained-token counts are padded to this (few distinct shapes)
CE_CHUNK_TOKENS = 256  # logits of 256 tokens x 32k vocab in fp32: 32 MB at a time


def compute_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the tensor's own."""
    device = reference.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return reference.dtype


# ---------------------------------------------------------------------- LoRA
class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen W; A and B keep their own dtype's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)  # scaling folded into the small B
        u = x2 @ a.t()
        w = weight.to(dtype)
        y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        y.addmm_(u, b.t())
        ctx.save_for_backward(x2, w, a, b, u)
        ctx.scaling, ctx.shape, ctx.x_dtype = scaling, shape, x.dtype
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, w, a, b, u = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
        gu = g @ b                                     # (tokens, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(g @ w, gu, a).view(ctx.shape).to(ctx.x_dtype)
        grad_a = (gu.t() @ x2).to(ctx.param_dtypes[0])
        grad_b = ((g.t() @ u) * ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None, None


def _fused_lora_forward(module, reference_forward):
    def forward(x, *args, **kwargs):
        adapters = module.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        base = module.base_layer
        if (args or kwargs or module.disable_adapters or module.merged or name is None
                or name not in module.lora_A or name in module.lora_variant
                or not isinstance(module.lora_dropout[name], torch.nn.Identity)
                or base.weight.requires_grad  # the kernel computes no gradient for W or b
                or (base.bias is not None and base.bias.requires_grad)):
            return reference_forward(x, *args, **kwargs)
        dtype = compute_dtype(base.weight)
        with torch.autocast(x.device.type, enabled=False):
            return LoraLinearFn.apply(x, base.weight, base.bias, module.lora_A[name].weight,
                                      module.lora_B[name].weight, module.scaling[name], dtype)
    return forward


# ---------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm via layer norm of ``[x, -x]``: its mean is 0 and its variance mean(x^2).

    PyTorch fuses layer norm (forward and backward, bf16 in, fp32 inside) but not
    RMSNorm on CPU; the concatenation costs one copy and saves the rest: 2.5 ms
    instead of 4.9 ms forward + backward for 1024 x 1024 bf16 here.
    """
    hidden = x.shape[-1]
    doubled = torch.cat([x, -x], dim=-1)
    w = weight.to(x.dtype)
    return F.layer_norm(doubled, (2 * hidden,), torch.cat([w, w]), None, eps)[..., :hidden].contiguous()


def _fused_rmsnorm_forward(module, reference_forward):
    def forward(hidden_states):
        if module.weight.requires_grad:
            return reference_forward(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


# ---------------------------------------------------------------------- attention
ATTENTION = "glmtune_fused"


class _Attention(torch.autograd.Function):
    """softmax(Q K^T * scale, masked) V as four batched matmuls and a fused softmax.

    PyTorch's CPU flash-attention backward measured 2-4x slower than this at
    training shapes here (e.g. 20 ms vs 5 ms for 16 x 4 heads x 176 tokens), and
    its math fallback is slower still. The price is keeping the attention
    probabilities for backward: batch x heads x length^2 values per layer.
    """

    @staticmethod
    def forward(ctx, q, k, v, keep, scale):
        q = q * scale
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)  # fill, not add: no -inf, no NaN
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function interface: (B, H, S, D) in, (B, S, H, D) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None:  # causal, aligned to the end (a KV cache holds the start)
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    else:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = compute_dtype(query)
    with torch.autocast(query.device.type, enabled=False):  # one dtype through forward and backward
        out = _Attention.apply(query.to(dtype), key.to(dtype), value.to(dtype), keep, scale)
    return out.transpose(1, 2).contiguous(), None


def _use_fused_attention(base) -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if base.config._attn_implementation != "sdpa" or not base._can_set_attn_implementation():
        return False
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # boolean masks, None when plainly causal
    base.set_attn_implementation(ATTENTION)
    return base.config._attn_implementation == ATTENTION


# ---------------------------------------------------------------------- head + loss
class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h W^T`` against ``labels``, gradients computed in chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype):
        # Rows are padded to a multiple of ROW_MULTIPLE (zeros, label 0, excluded below):
        # the number of trained tokens changes every batch, and each new matmul shape
        # costs oneDNN a new primitive and cache entry (measured: RSS creeping by 0.7 GB
        # over 200 tiny-glm steps, and slower steps).
        real = hidden.shape[0]
        padded = -(-real // ROW_MULTIPLE) * ROW_MULTIPLE
        h = F.pad(hidden.to(dtype), (0, 0, 0, padded - real))
        labels = F.pad(labels, (0, padded - real))
        w = weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, padded, CE_CHUNK_TOKENS):
            hc, yc = h[start:start + CE_CHUNK_TOKENS], labels[start:start + CE_CHUNK_TOKENS]
            valid = max(0, min(len(yc), real - start))  # padding rows sit at the end
            log_probs = torch.log_softmax(hc @ w.t(), dim=-1, dtype=torch.float32)
            total -= log_probs[:valid].gather(1, yc[:valid, None]).sum()
            if want_h or want_w:
                probs = log_probs.exp_()
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1  # d loss / d logits
                probs[valid:] = 0
                probs = probs.to(dtype)
                if want_h:
                    grad_h[start:start + CE_CHUNK_TOKENS] = probs @ w
                if want_w:
                    grad_w += (probs.t() @ hc).float()
        ctx.save_for_backward(grad_h[:real] if want_h else None, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_total).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token loss over positions whose label is not ``ignore_index``.

    ``hidden`` (batch, seq, dim) and ``labels`` (batch, seq) are already aligned:
    hidden[:, t] predicts labels[:, t]. Only trained positions reach the head.
    """
    keep = labels != ignore_index
    dtype = compute_dtype(weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden[keep], weight, labels[keep], dtype)


def _head_linear(model) -> torch.nn.Linear | None:
    """The Linear that produces the logits (the active trained copy if PEFT wraps it)."""
    head = model.get_output_embeddings()
    if hasattr(head, "modules_to_save"):  # peft's ModulesToSaveWrapper (trained head)
        active = head.active_adapters
        head = head.original_module if head.disable_adapters else head.modules_to_save[active[0]]
    return head if type(head) is torch.nn.Linear and head.bias is None else None


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Linear):
    """Within, the model's forward returns the hidden states in place of logits."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x):
    return x


# ---------------------------------------------------------------------- install
def install(model) -> tuple[torch.nn.Linear | None, list[str]]:
    """Patch ``model`` (a PEFT model) in place; returns (fusable head or None, what was fused)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_layers = norms = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = _fused_lora_forward(module, module.forward)
            lora_layers += 1
        elif (type(module).__name__ in PLAIN_RMSNORM_CLASSES
              and type(module).__module__.startswith("transformers.")
              and hasattr(module, "variance_epsilon")):
            module.forward = _fused_rmsnorm_forward(module, module.forward)
            norms += 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    native = type(base).__module__.startswith("transformers.")
    # glmtune's own architectures say so themselves (ChatGLM-6B: plain_lm_head)
    plain_head = ((native and base.config.model_type in PLAIN_HEAD_MODEL_TYPES)
                  or getattr(base, "plain_lm_head", False))
    head = _head_linear(model) if plain_head else None
    fused = [f"{lora_layers} LoRA layers"] if lora_layers else []
    if norms:
        fused.append(f"{norms} RMSNorms")
    if native and _use_fused_attention(base):
        fused.append("attention")
    if head is not None:
        fused.append("LM head + loss")
    return head, fused
