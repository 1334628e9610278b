"""The memory estimator (glmtune/plan/estimate.py) against real models.

Every expected number here comes from somewhere other than the estimator: parameter counts
from the transformers model a config.json builds (on the meta device, so a 355 B model
costs no memory), bytes per quantized weight from real bitsandbytes, activation bytes from
what autograd really keeps for a backward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from glmtune.plan import estimate as est
from tests.fixtures import chatglm_layout
from tests.fixtures.glm_configs import GLM_45_AIR, GLM_46, GLM_47_FLASH

# THUDM/chatglm3-6b's config.json: the published keys (chatglm_layout) at the published sizes.
CHATGLM3_6B = {**chatglm_layout.config_json(3, 65024), "hidden_size": 4096, "num_layers": 28,
               "ffn_hidden_size": 13696, "num_attention_heads": 32, "kv_channels": 128,
               "multi_query_group_num": 2}
# ChatGLM3-6B has 6,243,584,000 parameters. 362,496 of them are vectors the estimator leaves
# out as negligible: per layer the q/k/v bias (4,096 + 2 x 2 x 128) and two RMSNorm scales,
# plus the final norm.
CHATGLM3_6B_PARAMS = 6_243_584_000
CHATGLM3_6B_VECTORS = 28 * (4096 + 2 * 2 * 128 + 2 * 4096) + 4096
# THUDM/chatglm-6b's config.json (v1): a GELU MLP of two matrices, the LM head tied to the
# input embeddings without the file saying so.
CHATGLM_6B = {**chatglm_layout.config_json(1, 130528, {"<sop>": 130004, "<eop>": 130005,
                                                       "[MASK]": 130000, "[gMASK]": 130001}),
              "hidden_size": 4096, "inner_hidden_size": 16384, "num_layers": 28,
              "num_attention_heads": 32}


def _tiny_glm(**changes) -> dict:
    """config.json of a native transformers GLM (``model_type: glm``), tiny-glm's spec."""
    from transformers import GlmConfig

    from glmtune.model import tiny_glm

    spec = {k: v for k, v in tiny_glm.SPEC.items() if k not in ("version", "seed")}
    return GlmConfig(**{**spec, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
                        **changes}).to_dict()


def _tiny_moe(kind: str, **changes) -> dict:
    """config.json of the tiny GLM MoE test models (tests/fixtures/tiny_moe.py)."""
    from tests.fixtures.tiny_moe import config_for

    return {**config_for(kind, 300, [1]).to_dict(), **changes}


CONFIGS = {
    "ChatGLM-6B": CHATGLM_6B, "ChatGLM3-6B": CHATGLM3_6B,
    "GLM-4.5-Air": GLM_45_AIR, "GLM-4.6": GLM_46, "GLM-4.7-Flash": GLM_47_FLASH,
    # MLA with a full-rank q_proj (no q_a_proj / q_b_proj): the other attention layout
    "GLM-4.7-Flash, q_lora_rank null": {**GLM_47_FLASH, "q_lora_rank": None},
    "tiny-glm": _tiny_glm(), "tiny-glm, tied head": _tiny_glm(tie_word_embeddings=True),
    "tiny glm4_moe": _tiny_moe("glm4_moe"), "tiny glm4_moe_lite": _tiny_moe("glm4_moe_lite"),
    # which layers are MoE, named layer by layer (transformers 5 writes this list)
    "tiny glm4_moe_lite, a dense layer between": _tiny_moe(
        "glm4_moe_lite", num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"]),
}


def real_model(config: dict, device: str = "meta"):
    """The transformers model ``config`` (a config.json dict) builds; on the meta device
    unless it is to be trained, so that a 355 B model costs nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM, GlmForCausalLM

    from glmtune.model.chatglm import convert, detect, v1_model

    with torch.device(device):
        if config.get("model_type") == "chatglm" and detect.version_from_config(config) == 1:
            names = ("auto_map", "architectures", "model_type", "_name_or_path",
                     "transformers_version")  # what v1_model.config_from_dir drops
            return v1_model.ChatGLM1ForCausalLM(v1_model.ChatGLM1Config(
                **{k: v for k, v in config.items() if k not in names}))
        if config.get("model_type") == "chatglm":  # v2/v3 load as GlmForCausalLM (convert.py)
            return GlmForCausalLM(convert.glm_config(config))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


@dataclass
class Counts:
    """Parameters of a real model, sorted the way memory depends on them."""

    everything: int
    matrices: int     # what the estimator counts: every weight of two or more dimensions
    linear: int       # nn.Linear weights in the decoder blocks: what bitsandbytes quantizes
    not_linear: int   # other matrices in the blocks: routed experts (3-D) and routers
    embeddings: int   # input embeddings and LM head, counted once when tied
    largest: int      # the biggest single tensor
    largest_layer: int

    @classmethod
    def of(cls, model) -> Counts:
        blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
        linear = not_linear = 0
        for module in blocks.modules():
            for param in module.parameters(recurse=False):
                if param.ndim < 2:
                    continue
                if isinstance(module, torch.nn.Linear):
                    linear += param.numel()
                else:
                    not_linear += param.numel()
        embeddings = {id(m.weight): m.weight.numel() for m in
                      (model.get_input_embeddings(), model.get_output_embeddings())}
        params = list(model.parameters())  # each tied tensor once
        return cls(everything=sum(p.numel() for p in params),
                   matrices=sum(p.numel() for p in params if p.ndim >= 2),
                   linear=linear, not_linear=not_linear, embeddings=sum(embeddings.values()),
                   largest=max(p.numel() for p in params),
                   largest_layer=max(sum(p.numel() for p in layer.parameters() if p.ndim >= 2)
                                     for layer in blocks))


# --- parameter counts -----------------------------------------------------------------

def test_chatglm3_6b_has_its_published_parameter_count():
    real = Counts.of(real_model(CHATGLM3_6B))
    assert real.everything == CHATGLM3_6B_PARAMS  # the meta model is ChatGLM3-6B
    assert est.shape_from_config(CHATGLM3_6B).total_params == CHATGLM3_6B_PARAMS - CHATGLM3_6B_VECTORS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shape_counts_the_weights_of_the_real_model(name):
    shape = est.shape_from_config(CONFIGS[name])
    real = Counts.of(real_model(CONFIGS[name]))
    assert shape.total_params == real.matrices
    assert shape.linear_params == real.linear
    # routed experts and routers stay resident whichever few of them run per token
    assert shape.expert_params == real.not_linear
    assert shape.embedding_params == real.embeddings
    assert shape.largest_tensor_params() == real.largest
    assert shape.layer_weight_params() == real.largest_layer  # what FSDP / ZeRO-3 gather at once


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_bytes_follow_dtype_and_quantization(name):
    shape = est.shape_from_config(CONFIGS[name])
    real = Counts.of(real_model(CONFIGS[name]))

    def weights(**settings) -> int:
        return est.estimate(shape, est.Settings(**settings)).weights

    assert weights(base_dtype="float32") == 4 * real.matrices
    assert weights(base_dtype="bfloat16") == 2 * real.matrices
    # bitsandbytes replaces nn.Linear layers only: embeddings, routed experts and routers keep
    # the base dtype, and the Linear weights cost what a quantized weight costs
    rest = 2 * (real.matrices - real.linear)
    assert 0.5 * real.linear < weights(quant="4bit", base_dtype="bfloat16") - rest < 0.6 * real.linear
    assert 1.0 * real.linear < weights(quant="8bit", base_dtype="bfloat16") - rest < 1.01 * real.linear


@pytest.mark.parametrize("quant, slack", [("4bit", 1.1), ("8bit", 1.0)])
def test_quantized_bytes_are_what_bitsandbytes_stores(quant, slack):
    """Every Linear of a decoder layer quantized by real bitsandbytes as glmtune loads it
    (nf4 with double quantization; int8 with a float32 scale per row): the estimate is
    within 1% below and ``slack`` above those bytes."""
    bnb = pytest.importorskip("bitsandbytes")

    config = _tiny_glm(hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=64)
    model = real_model(config)
    stored = 0
    torch.manual_seed(0)
    for module in model.model.layers.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        weight = torch.randn(out_features, in_features) * 0.02
        if quant == "4bit":
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4",
                                      compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False,
                                        has_fp16_weights=False)
            layer.load_state_dict({"weight": weight}, strict=False)
        state = layer.to("cpu").state_dict()  # bitsandbytes quantizes on the move to a device
        assert state["weight"].element_size() == 1  # quantized, not a float
        stored += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    shape = est.shape_from_config(config)
    predicted = est.estimate(shape, est.Settings(quant=quant, base_dtype="bfloat16")).weights
    predicted -= 2 * shape.embedding_params
    assert 0.99 * stored <= predicted <= slack * stored + 1


SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, head_dim=16)
TRAINED = {"ChatGLM-6B, tiny": chatglm_layout.config_json(1, 320),
           "ChatGLM3-6B, tiny": chatglm_layout.config_json(3, 320),
           "tiny-glm, small": _tiny_glm(**SMALL),
           "tiny-glm, small, tied head": _tiny_glm(**SMALL, tie_word_embeddings=True),
           "tiny glm4_moe": CONFIGS["tiny glm4_moe"],
           "tiny glm4_moe_lite": CONFIGS["tiny glm4_moe_lite"]}


@pytest.mark.parametrize("name, experts, embeddings", [
    ("ChatGLM-6B, tiny", False, False), ("ChatGLM3-6B, tiny", False, False),
    ("tiny-glm, small", False, False), ("tiny-glm, small", False, True),
    ("tiny-glm, small, tied head", False, True),
    ("tiny glm4_moe", False, False), ("tiny glm4_moe", True, False),
    ("tiny glm4_moe_lite", False, False), ("tiny glm4_moe_lite", True, False)])
def test_trainable_bytes_are_those_of_the_parameters_peft_trains(name, experts, embeddings):
    """glmtune's LoRA on each family's default targets, with --lora-experts the routed
    experts, with train_embeddings the embeddings and head (one matrix when tied): each
    trained parameter costs 16 bytes (float32 value and gradient, two AdamW moments)."""
    from glmtune.model import lora
    from glmtune.model.family import detect_family

    config = TRAINED[name]
    torch.manual_seed(0)
    peft_model = lora.attach_lora(real_model(config, device="cpu"), detect_family(config), r=4,
                                  alpha=8, dropout=0.0, targets="auto",
                                  train_embeddings=embeddings, experts=experts)
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    settings = est.Settings(lora_r=4, lora_experts=experts, train_embeddings=embeddings)
    assert est.estimate(est.shape_from_config(config), settings).trainable == 16 * trained


# --- activations ---------------------------------------------------------------------

def kept_for_backward(model, batch: int, length: int) -> int:
    """Bytes autograd holds between a training forward and its backward, parameters aside
    (they are there anyway), each storage once however many views of it were saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (batch, length),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.fixture(scope="module")
def lora_models():
    """LoRA-wrapped tiny GLMs, one whose memory is in its layers, one whose is in its vocabulary."""
    from transformers import GlmConfig, GlmForCausalLM

    from glmtune.model import lora
    from glmtune.model.family import detect_family

    configs = {"layers": _tiny_glm(vocab_size=512, hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=3, head_dim=32),
               "vocabulary": _tiny_glm(vocab_size=8192, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, head_dim=16)}
    models = {}
    torch.manual_seed(0)
    for name, config in configs.items():
        base = GlmForCausalLM(GlmConfig(**config)).train()
        models[name] = (lora.attach_lora(base, detect_family(config), r=8, alpha=16, dropout=0.0,
                                         targets="auto", train_embeddings=False),
                        est.shape_from_config(config))
    return models


@pytest.mark.parametrize("kind, batch, length", [
    ("layers", 1, 16), ("layers", 4, 128), ("layers", 1, 512),
    ("vocabulary", 2, 64), ("vocabulary", 1, 512)])
def test_activations_and_logits_are_what_a_real_forward_keeps(lora_models, kind, batch, length):
    """The estimate is a fit of peak memory (bf16 autocast copies, the logits' gradient),
    not a count of saved tensors; what it must do is move with them: within a factor of
    two below and four above (it also counts the fast path's attention probabilities, which
    this reference model's SDPA does not keep), which a lost batch, layer, length or
    vocabulary factor breaks."""
    model, shape = lora_models[kind]
    kept = kept_for_backward(model, batch, length)
    predicted = est.estimate(shape, est.Settings(batch_size=batch, seq_len=length))
    assert kept / 2 <= predicted.activations + predicted.logits <= 4 * kept


def test_activations_grow_with_batch_and_length():
    shape = est.shape_from_config(CHATGLM3_6B)

    def predicted(**settings) -> est.Estimate:
        return est.estimate(shape, est.Settings(base_dtype="bfloat16", **settings))

    for checkpointing in (False, True):
        one = predicted(batch_size=1, seq_len=1024, gradient_checkpointing=checkpointing)
        # rows of a batch are independent: four rows keep four times what one keeps
        four = predicted(batch_size=4, seq_len=1024, gradient_checkpointing=checkpointing)
        assert (four.activations, four.logits) == (4 * one.activations, 4 * one.logits)
        # attention scores grow with the square of the length, everything else linearly
        longer = predicted(batch_size=1, seq_len=4096, gradient_checkpointing=checkpointing)
        assert longer.logits == 4 * one.logits
        assert 4 * one.activations < longer.activations < 16 * one.activations


def test_gradient_checkpointing_keeps_less_and_grows_slowly_with_depth():
    """With checkpointing a layer keeps its input, not every intermediate tensor: far less,
    and adding layers adds little."""
    settings = est.Settings(base_dtype="bfloat16", seq_len=2048, batch_size=2)

    def activations(layers: int, checkpointing: bool) -> int:
        shape = est.shape_from_config({**CHATGLM3_6B, "num_layers": layers})
        return est.estimate(shape, est.Settings(**{**settings.__dict__,
                                                   "gradient_checkpointing": checkpointing})).activations

    assert activations(28, True) < activations(28, False) / 4
    per_layer_checkpointed = activations(28, True) - activations(14, True)
    per_layer = activations(28, False) - activations(14, False)
    assert 0 < per_layer_checkpointed < per_layer / 10


def test_moe_activations_follow_the_experts_that_run_but_weights_all_experts():
    base = est.shape_from_config(GLM_45_AIR)
    more = est.shape_from_config({**GLM_45_AIR, "num_experts_per_tok": 16})
    settings = est.Settings(base_dtype="bfloat16", seq_len=1024, device="cuda")
    assert est.estimate(more, settings).weights == est.estimate(base, settings).weights
    assert est.estimate(more, settings).activations > est.estimate(base, settings).activations
    # and the resident weights are every expert of the real model
    assert base.expert_params == Counts.of(real_model(GLM_45_AIR)).not_linear


# --- config.json in a directory --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_in_a_directory_gives_the_same_shape(name, tmp_path):
    """As downloaded (the dict written verbatim) and as transformers writes it back (its own
    key names: mlp_layer_types, rope_parameters, ...): the shape the planner reads is the same."""
    from glmtune.model import load

    config = CONFIGS[name]
    verbatim, resaved = tmp_path / "verbatim", tmp_path / "resaved"
    verbatim.mkdir()
    (verbatim / "config.json").write_text(json.dumps(config))
    expected = est.shape_from_config(config)
    assert est.shape_from_config(load.resolve(str(verbatim)).config) == expected
    if config.get("model_type") != "chatglm":  # transformers cannot write THUDM's format
        real_model(config).config.save_pretrained(resaved)
        assert est.shape_from_config(load.resolve(str(resaved)).config) == expected


# --- what loading holds besides the model -------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(**_tiny_glm(vocab_size=512, hidden_size=64,
                                                 intermediate_size=96, num_hidden_layers=2)))
    return model, tmp_path_factory.mktemp("saved")


def test_largest_shard_bytes_is_the_biggest_safetensors_tensor(saved_model):
    model, root = saved_model
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    whole, sharded = root / "whole", root / "sharded"
    model.save_pretrained(whole)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert est.largest_shard_bytes(whole) == biggest
    assert est.largest_shard_bytes(sharded) == biggest
    bf16 = root / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    model.float()
    assert est.largest_shard_bytes(bf16) == biggest // 2


def test_largest_shard_bytes_reads_a_pickle_whole(saved_model, tmp_path):
    model, _ = saved_model
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert est.largest_shard_bytes(tmp_path) == (tmp_path / "pytorch_model.bin").stat().st_size
    assert est.largest_shard_bytes(tmp_path / "empty") == 0


def test_largest_shard_bytes_falls_back_to_file_size_on_a_broken_header(saved_model, tmp_path):
    model, _ = saved_model
    model.save_pretrained(tmp_path / "m")
    (file,) = (tmp_path / "m").glob("*.safetensors")
    data = bytearray(file.read_bytes())
    data[8:16] = b"not json"
    file.write_bytes(bytes(data))
    assert est.largest_shard_bytes(tmp_path / "m") == file.stat().st_size


def test_peak_is_loading_when_reading_a_shard_costs_more_than_training():
    shape = est.shape_from_config(CHATGLM3_6B)
    settings = est.Settings(base_dtype="bfloat16", seq_len=256)
    training = est.estimate(shape, settings, shard_bytes=0)
    assert training.peak == training.train_peak
    huge = est.estimate(shape, settings, shard_bytes=100 * 2**30)
    assert huge.peak == huge.load_peak == huge.runtime + huge.weights + 100 * 2**30
    # quantizing holds the tensor as read, in float32 and quantized: more than reading it
    quantized = est.estimate(shape, est.Settings(quant="4bit", seq_len=256), shard_bytes=2**30)
    assert quantized.load_transient > 2**30


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("config, key", [
    (GLM_45_AIR, "hidden_size"), (GLM_45_AIR, "num_attention_heads"),
    (GLM_45_AIR, "num_hidden_layers"), (GLM_45_AIR, "vocab_size"),
    (GLM_45_AIR, "moe_intermediate_size"),
    (CHATGLM3_6B, "num_layers"), (CHATGLM3_6B, "padded_vocab_size")])
def test_a_config_without_a_size_is_refused_not_guessed(config, key):
    """A missing size must not become 0 layers or an empty vocabulary (a plan that fits
    anything): the planner turns the KeyError into "no prediction"."""
    broken = {k: v for k, v in config.items() if k != key}
    if key == "padded_vocab_size":
        broken.pop("vocab_size", None)
    with pytest.raises(KeyError):
        est.shape_from_config(broken)


def test_an_unknown_quantization_is_an_error():
    with pytest.raises(KeyError):
        est.estimate(est.shape_from_config(CHATGLM3_6B), est.Settings(quant="3bit"))
