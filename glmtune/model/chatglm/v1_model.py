"""ChatGLM-6B (v1) as a native transformers model, written from the architecture.

THUDM's published ``modeling_chatglm.py`` no longer runs under transformers 5
(and runs only with ``trust_remote_code``). This module implements the same
network (GLM-130B style) so that a THUDM/chatglm-6b directory loads without
remote code and gives the published code's logits:

- LayerNorm, then self-attention and a GELU (tanh) MLP, with the residual taken
  from the *normalized* input scaled by alpha: ``h = ln(x) * alpha + f(ln(x))``.
- 2-D rotary positions: each head's first half rotates by the position id,
  the second half by the block position id. Up to ``<sop>`` positions count
  0, 1, ...; from ``<sop>`` on the position stays at the ``[gMASK]`` index
  and the block position counts 1, 2, ...
- The prompt up to ``<sop>`` attends bidirectionally, the rest causally;
  masked scores are set to -10000 before softmax, which is done in float32.
- ``query_key_value`` is one Linear whose output holds q, k, v interleaved
  per head ([h0: q k v][h1: q k v]...), so it stays one module: LoRA targets
  ``query_key_value`` / ``dense`` / ``dense_h_to_4h`` / ``dense_4h_to_h``
  act on the same weights as with THUDM's code.
- Embeddings tied to the LM head.

Parameter names equal the published tensor names, so checkpoints load and
export without renaming; the stored ``rotary_emb.inv_freq`` buffers are
recomputed, never loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from glmtune.errors import GlmtuneError
from glmtune.model.files import read_json_object

# THUDM's GLMBlock takes num_layers=28 as a default argument that ChatGLMModel never
# passes on, so the published model computes alpha = sqrt(2 * 28) whatever config.json
# says; the checkpoints were trained with it, so it is a constant of the architecture.
RESIDUAL_ALPHA = math.sqrt(2 * 28)
MASKED_SCORE = -10000.0
ROTARY_BASE = 10000


class ChatGLM1Config(PreTrainedConfig):
    """config.json of THUDM/chatglm-6b; the defaults are the published 6B values."""

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "intermediate_size": "inner_hidden_size",
                     "max_position_embeddings": "max_sequence_length"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    use_cache: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


# --- positions, masks, rotary -----------------------------------------------

def _first(hit: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row, ``index`` at the first True of ``hit``; -1 where there is none."""
    big = torch.iinfo(index.dtype).max
    first = torch.where(hit, index, torch.full_like(index, big)).min(dim=-1).values
    return torch.where(hit.any(dim=-1), first, torch.full_like(first, -1))


def glm_position_ids(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                 config: ChatGLM1Config) -> torch.LongTensor:
    """[batch, 2, seq]: GLM's position ids and block position ids.

    Positions count from each row's first real token (padding on either side is
    skipped), as THUDM's tokenizer computes them before it pads. From ``<sop>``
    on, the position stays at the first ``[gMASK]`` (or ``[MASK]``) and the block
    position counts 1, 2, ...; a row without ``<sop>`` is all context.
    """
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.bool())
    index = (valid.long().cumsum(-1) - 1).clamp(min=0)
    context = _first((input_ids == config.bos_token_id) & valid, index)[:, None]
    gmask = _first((input_ids == config.gmask_token_id) & valid, index)
    mask = _first((input_ids == config.mask_token_id) & valid, index)
    mask_position = torch.where(gmask >= 0, gmask, mask)[:, None]
    generated = (context >= 0) & (index >= context)
    positions = torch.where(generated & (mask_position >= 0), mask_position, index)
    blocks = torch.where(generated, index - context + 1, torch.zeros_like(index))
    return torch.stack((positions, blocks), dim=1) * valid[:, None, :]


def _bidirectional_prefix(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                          config: ChatGLM1Config) -> torch.LongTensor:
    """[batch]: absolute index of each row's first ``<sop>`` (keys before it are visible
    to every query); 0 where a row has none, which leaves it causal."""
    hit = input_ids == config.bos_token_id
    if attention_mask is not None:
        hit &= attention_mask.bool()
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return _first(hit, columns).clamp(min=0)


def _rotary_tables(positions: torch.LongTensor, rotary_dim: int, dtype: torch.dtype):
    """cos, sin of shape [batch, 2, seq, rotary_dim] for GLM's 2-D positions.

    THUDM's RotaryEmbedding stores its inverse frequencies in fp16 (the stored
    values are fp16-rounded, whatever the model dtype) and, for a half model,
    computes the angles and their cos/sin in fp16 too. Both roundings are
    reproduced here for fp16; float32 and bfloat16 use float32 angles (the published
    code would round positions to bf16, which it was never trained with).
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim
    inv_freq = (1.0 / ROTARY_BASE ** exponents).half().float()
    if dtype == torch.float16:
        angles = (positions.half().float()[..., None] * inv_freq).half().float()
    else:
        angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # GLM's tanh approximation, written as the published code writes it.
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


# --- modules ----------------------------------------------------------------

class ChatGLM1Attention(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))
        # 2-D rotary: first half of each head by position, second half by block position.
        half = self.head_dim // 2
        query = torch.cat((_rotate(query[..., :half], cos[:, :1], sin[:, :1]),
                           _rotate(query[..., half:], cos[:, 1:], sin[:, 1:])), dim=-1)
        key = torch.cat((_rotate(key[..., :half], cos[:, :1], sin[:, :1]),
                         _rotate(key[..., half:], cos[:, 1:], sin[:, 1:])), dim=-1)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # The published scaling: the query shrunk by (layer + 1) more, the float32 scores
        # scaled back before softmax, which keeps fp16 scores in range.
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(query / (math.sqrt(self.head_dim) * coeff), key.transpose(-1, -2))
        scores = scores.masked_fill(~allowed, MASKED_SCORE)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, seq, -1)
        return self.dense(context)


class ChatGLM1MLP(nn.Module):
    def __init__(self, config: ChatGLM1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(_gelu(self.dense_h_to_4h(hidden_states)))


class ChatGLM1Block(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM1Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLM1Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLM1MLP(config)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, cache: Cache | None = None, use_cache: bool = False):
        normed = self.input_layernorm(hidden_states)
        hidden_states = normed * RESIDUAL_ALPHA + self.attention(normed, cos, sin, allowed, cache)
        normed = self.post_attention_layernorm(hidden_states)
        return normed * RESIDUAL_ALPHA + self.mlp(normed)


class ChatGLM1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM1Config
    config: ChatGLM1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLM1Block"]
    # Real checkpoints store each layer's rotary inverse frequencies; they are recomputed.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class ChatGLM1Model(ChatGLM1PreTrainedModel):
    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        _check_supported(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLM1Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                past_key_values: Cache | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is None and position_ids is None:
            raise ValueError("ChatGLM-6B's 2-D positions come from the [gMASK] and <sop> tokens: "
                             "with inputs_embeds, pass position_ids of shape [batch, 2, seq]")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ChatGLM-6B takes the usual 0/1 attention mask of shape [batch, seq] "
                             "and builds its prefix-bidirectional mask itself, not "
                             f"{tuple(attention_mask.shape)}")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden_states.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if past:
                raise ValueError("with a cache, pass position_ids of shape [batch, 2, seq] "
                                 "(generate() computes them)")
            position_ids = glm_position_ids(input_ids, attention_mask, self.config)
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError("ChatGLM-6B takes 2-D position_ids of shape [batch, 2, seq] "
                             f"(position, block position), not {tuple(position_ids.shape)}")

        # allowed[b, 0, q, k]: key k is visible to query q.
        device = hidden_states.device
        keys = torch.arange(past + seq, device=device)
        allowed = keys[None, :] <= (past + torch.arange(seq, device=device))[:, None]
        allowed = allowed[None].expand(batch, -1, -1)
        if past == 0 and input_ids is not None:
            prefix = _bidirectional_prefix(input_ids, attention_mask, self.config)
            allowed = allowed | (keys[None, None, :] < prefix[:, None, None])
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, -(past + seq):]
        allowed = allowed[:, None]

        cos, sin = _rotary_tables(position_ids, self.config.hidden_size
                                  // (2 * self.config.num_attention_heads), hidden_states.dtype)
        cos, sin = cos.to(device), sin.to(device)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, cos, sin, allowed, cache=cache, use_cache=use_cache)
        hidden_states = self.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       cache=cache if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden else None)


class ChatGLM1ForCausalLM(ChatGLM1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # logits = lm_head(last hidden state), nothing after: glmtune's fused head + loss applies
    plain_lm_head = True

    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.transformer = ChatGLM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        outputs = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        cache=outputs.cache,
                                        hidden_states=outputs.hidden_states)
        return result.to_tuple() if return_dict is False else result

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs):
        # generate() makes 1-D positions counting up by one; ChatGLM-6B's are 2-D and
        # stand still after <sop>, so they are recomputed from the whole sequence so far.
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if inputs.get("input_ids") is None:
            raise ValueError("ChatGLM-6B generates from input_ids (its positions come from "
                             "the [gMASK] and <sop> tokens), not from inputs_embeds")
        positions = glm_position_ids(input_ids, kwargs.get("attention_mask"), self.config)
        inputs["position_ids"] = positions[..., -inputs["input_ids"].shape[1]:]
        return inputs


# --- loading ----------------------------------------------------------------

def _check_supported(config: ChatGLM1Config, where: str = "config") -> None:
    problems = []
    if config.quantization_bit:
        problems.append(
            f"it is pre-quantized to {config.quantization_bit} bits (quantization_bit) with "
            "THUDM's own kernels; use the full checkpoint (THUDM/chatglm-6b) with --quant 4bit "
            "or --quant 8bit instead")
    if config.pre_seq_len:
        problems.append("it is a P-Tuning v2 checkpoint (pre_seq_len); load the base model "
                        "THUDM/chatglm-6b and train a LoRA adapter instead")
    if not config.position_encoding_2d:
        problems.append("position_encoding_2d is false; only the published 2-D positions are "
                        "supported")
    if config.hidden_size % (4 * config.num_attention_heads):
        problems.append(f"hidden_size {config.hidden_size} must be a multiple of 4 x "
                        f"num_attention_heads ({config.num_attention_heads}) for 2-D rotary")
    if problems:
        raise GlmtuneError(f"{where}: cannot load this ChatGLM-6B checkpoint: " + "; ".join(problems))


def config_from_dir(model_dir: str | Path) -> ChatGLM1Config:
    """ChatGLM1Config from a THUDM/chatglm-6b style config.json (auto_map and THUDM's
    class names dropped: nothing here runs the directory's own code)."""
    file = Path(model_dir) / "config.json"
    data = read_json_object(file, "model config")
    for key in ("auto_map", "architectures", "model_type", "_name_or_path", "transformers_version"):
        data.pop(key, None)
    try:
        config = ChatGLM1Config(**data)
    except (TypeError, ValueError) as exc:
        raise GlmtuneError(f"{file}: not a valid ChatGLM-6B config ({exc})") from exc
    _check_supported(config, str(file))
    config.architectures = ["ChatGLM1ForCausalLM"]
    return config


def load_v1(model_dir: str | Path, **load_kwargs: Any) -> ChatGLM1ForCausalLM:
    """Load a THUDM/chatglm-6b directory natively.

    ``load_kwargs`` go to ``from_pretrained`` (dtype, quantization_config, device_map...);
    the shards are read one at a time (never two copies of the weights), ``.bin`` only
    through ``torch.load(weights_only=True, mmap=True)``, safetensors when present.
    """
    from glmtune.model.chatglm import weights

    config = config_from_dir(model_dir)
    return weights.from_pretrained(ChatGLM1ForCausalLM, model_dir, config=config, **load_kwargs)
