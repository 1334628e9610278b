"""ChatGLM2-6B / ChatGLM3-6B (and GLM-4-9B in its original layout) as transformers' GlmForCausalLM.

THUDM's ChatGLM2/3 architecture is exactly what transformers ships as ``GlmForCausalLM``
(RMSNorm, SwiGLU, rotary on half of each head, grouped-query attention with q/k/v bias,
untied head); only the names differ and ``query_key_value`` is one fused matrix. So:

- config.json -> :func:`glm_config`;
- tensors are renamed and ``query_key_value`` split into q / k / v *while loading*, by
  transformers' own weight-conversion machinery (a conversion mapping registered for
  :class:`ChatGLMAsGlm`). Each tensor is converted as it is read, so there are never
  two copies of the weights, and bitsandbytes 4/8-bit quantizes the converted tensors
  exactly as it does a native checkpoint;
- :func:`to_original` maps a GLM state dict back to THUDM's names (export), and
  :func:`adapter_to_original` turns a LoRA on q/k/v into the equivalent LoRA on
  ``query_key_value``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError

# THUDM name (regex on the key) -> GlmForCausalLM name. One table for both directions.
RENAMES = (
    (r"transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
    (r"transformer\.encoder\.final_layernorm\.", "model.norm."),
    (r"transformer\.encoder\.layers\.", "model.layers."),
    (r"transformer\.output_layer\.", "lm_head."),
    (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.gate_up_proj."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
)
QKV = "self_attention.query_key_value"
SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Recomputed by every implementation from the config; the published checkpoints store it.
DROPPED = (r"transformer\.rotary_pos_emb\.inv_freq$",)

# The architecture options THUDM's code has that GlmForCausalLM does not (value it must have).
_REQUIRED = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
             "apply_residual_connection_post_layernorm": False, "original_rope": True}


def glm_config(config: Mapping[str, Any], model_dir: str | Path = "config.json"):
    """transformers' GlmConfig for a ChatGLM2/3 config.json (a dict)."""
    wrong = [f"{k}: {config[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items()
             if k in config and config[k] != v]
    if wrong:
        raise GlmtuneError(f"{model_dir}: this ChatGLM variant is not supported natively: "
                           + "; ".join(wrong))
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    groups = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    rope_theta = 10000.0 * float(config.get("rope_ratio", 1))
    eos = config.get("eos_token_id", 2)
    return _config_class()(
        vocab_size=config.get("padded_vocab_size") or config["vocab_size"],
        hidden_size=config["hidden_size"], intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"], num_attention_heads=heads,
        num_key_value_heads=groups, head_dim=head_dim, partial_rotary_factor=0.5,
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5), attention_bias=bool(
            config.get("add_qkv_bias", True)),
        attention_dropout=config.get("attention_dropout", 0.0),
        max_position_embeddings=config.get("seq_length", 8192),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "partial_rotary_factor": 0.5},
        tie_word_embeddings=False, pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=eos, bos_token_id=None, use_cache=True)


_CLASSES: dict[str, type] = {}


def _config_class():
    """GlmConfig that reads a ChatGLM config.json as glm_config does.

    Libraries re-read the base's config through ``type(model.config).from_pretrained(path)``
    (peft compares vocabulary sizes that way before saving an adapter); plain GlmConfig
    would read THUDM's keys as defaults and report a resized vocabulary.
    """
    if "config" not in _CLASSES:
        from transformers import GlmConfig

        class GlmConfigFromChatGLM(GlmConfig):
            @classmethod
            def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
                from glmtune.model.load import _read_config

                path = Path(str(pretrained_model_name_or_path))
                if (path / "config.json").is_file():
                    data = _read_config(path)
                    if data.get("model_type") == "chatglm":
                        return glm_config(data, path / "config.json")
                return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

        _CLASSES["config"] = GlmConfigFromChatGLM
    return _CLASSES["config"]


def qkv_sizes(config) -> tuple[int, int, int]:
    """Rows of q, k, v in ``query_key_value`` for a GlmConfig."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return q, kv, kv


def _conversion_mapping():
    from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

    class SplitQKV(ConversionOps):
        """query_key_value (weight or bias) -> q, k, v rows, sized from the config."""

        def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
            import torch

            (tensors,) = input_dict.values()
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            parts = torch.split(tensor, list(qkv_sizes(config)), dim=0)
            return {t: p.contiguous() for t, p in zip(target_patterns, parts)}

        @property
        def reverse_op(self):
            from transformers.core_model_loading import Concatenate

            return Concatenate(dim=0)

    return ([WeightRenaming(source, target) for source, target in RENAMES]
            + [WeightConverter(QKV, list(SPLIT), [SplitQKV()])])


def model_class():
    """GlmForCausalLM under a name of its own, so our conversion applies to it alone."""
    if "model" in _CLASSES:
        return _CLASSES["model"]
    from transformers import GlmForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    class ChatGLMAsGlm(GlmForCausalLM):
        """GlmForCausalLM loading a THUDM ChatGLM2/3 checkpoint (see module doc)."""

        _keys_to_ignore_on_load_unexpected = list(DROPPED)

    register_checkpoint_conversion_mapping(ChatGLMAsGlm.__name__, _conversion_mapping(),
                                           overwrite=True)
    _CLASSES["model"] = ChatGLMAsGlm
    return ChatGLMAsGlm


def load_glm(model_dir: str | Path, **load_kwargs: Any):
    """A ChatGLM2/3 directory loaded as a GlmForCausalLM (converted tensor by tensor);
    ``load_kwargs`` go to ``from_pretrained`` (dtype, quantization_config, device_map)."""
    from transformers import GlmForCausalLM

    from glmtune.model.chatglm import weights
    from glmtune.model.load import _read_config

    model_dir = Path(model_dir)
    config = glm_config(_read_config(model_dir), model_dir / "config.json")
    model = weights.from_pretrained(model_class(), model_dir, config=config, **load_kwargs)
    # Loaded, it is a plain GlmForCausalLM: what recognises transformers' own classes (the
    # fast path's fused attention and head) must see it as one.
    model.__class__ = GlmForCausalLM
    model.generation_config.eos_token_id = config.eos_token_id
    return model


# --- back to THUDM's layout (export) ------------------------------------------

def _glm_to_original_name(name: str) -> str:
    for source, target in RENAMES:
        plain = source.replace("\\", "")
        if target in name:
            name = name.replace(target, plain)
    return name


def to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """A GlmForCausalLM state dict (names, tensors) in THUDM's names, q/k/v fused again."""
    import torch

    out: dict[str, Any] = {}
    pending: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        part = next((p for p in SPLIT if f".{p}." in name), None)
        if part is None:
            out[_glm_to_original_name(name)] = tensor
            continue
        fused = _glm_to_original_name(name.replace(part, QKV))
        pending.setdefault(fused, {})[part] = tensor
    for fused, parts in pending.items():
        if set(parts) != set(SPLIT):
            raise GlmtuneError(f"cannot rebuild {fused}: got only {sorted(parts)}")
        out[fused] = torch.cat([parts[p] for p in SPLIT], dim=0)
    return out


def adapter_to_original(adapter: Mapping[str, Any], rank: int) -> tuple[dict[str, Any], int]:
    """A PEFT LoRA state dict on q/k/v -> the same update as a LoRA on ``query_key_value``.

    W_qkv + B A with A = [A_q; A_k; A_v] (3r x in) and B = blockdiag(B_q, B_k, B_v)
    ((q+k+v) x 3r): row block i of B A is B_i A_i, exactly each projection's update.
    Other modules are renamed. Returns the state dict (PEFT key names, THUDM module
    names) and the new rank 3r. An adapter on only some of q/k/v is refused.
    """
    import torch

    out: dict[str, Any] = {}
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    pattern = re.compile(r"^(.*)\.(" + "|".join(re.escape(p) for p in SPLIT)
                         + r")\.(lora_A|lora_B)\.(.*)$")
    for key, tensor in adapter.items():
        match = pattern.match(key)
        if match is None:
            out[_glm_to_original_name(key)] = tensor
            continue
        prefix, part, kind, suffix = match.groups()
        groups.setdefault(f"{prefix}|{suffix}", {}).setdefault(kind, {})[part] = tensor
    for group, kinds in groups.items():
        prefix, suffix = group.split("|")
        a_parts, b_parts = kinds.get("lora_A", {}), kinds.get("lora_B", {})
        if set(a_parts) != set(SPLIT) or set(b_parts) != set(SPLIT):
            raise GlmtuneError(f"{prefix}: the adapter must train all of q_proj, k_proj and "
                               "v_proj to be written on query_key_value")
        a = torch.cat([a_parts[p] for p in SPLIT], dim=0)
        b = torch.block_diag(*(b_parts[p] for p in SPLIT))
        base = _glm_to_original_name(f"{prefix}.{QKV}")
        out[f"{base}.lora_A.{suffix}"] = a
        out[f"{base}.lora_B.{suffix}"] = b
    return out, 3 * rank
