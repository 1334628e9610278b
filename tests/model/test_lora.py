"""glmtune/model/lora.py on tiny real models with real PEFT: where LoRA goes for each family,
what trains and in which dtype, the guard around PEFT's target renaming, the adapter-config
check, and NEFTune's embedding noise. The MoE router / routed-expert rules through
attach_lora are in test_glm_moe.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.model import lora
from glmtune.model.family import CHATGLM_TARGETS, GLM4_TARGETS, MOE_EXPERT_PARAMETERS, detect_family
from tests.fixtures import chatglm_layout

LAYERS = 2
V1_IDS = {"[MASK]": 300, "[gMASK]": 301, "<sop>": 302, "<eop>": 303, "<pad>": 3}


def glm():
    from transformers import GlmConfig, GlmForCausalLM

    return GlmForCausalLM(GlmConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=LAYERS, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                    eos_token_id=1, bos_token_id=None))


def chatglm1():
    from glmtune.model.chatglm.v1_model import ChatGLM1Config, ChatGLM1ForCausalLM

    config = chatglm_layout.config_json(1, 320, V1_IDS)
    names = ("auto_map", "architectures", "model_type", "_name_or_path", "transformers_version")
    return ChatGLM1ForCausalLM(ChatGLM1Config(**{k: v for k, v in config.items() if k not in names}))


def llama():
    """A native architecture glmtune has no family for: PEFT's all-linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, pad_token_id=0))


def moe(kind: str = "glm4_moe"):
    from transformers import AutoModelForCausalLM

    from tests.fixtures.tiny_moe import config_for

    return AutoModelForCausalLM.from_config(config_for(kind, 320, [1]))


def family_of(model):
    config = model.config.to_dict()
    if type(model).__name__ == "ChatGLM1ForCausalLM":  # its config object reads as THUDM's file
        config = chatglm_layout.config_json(1, 320)
    return detect_family(config)


def attach(model, **options):
    settings = dict(r=4, alpha=8, dropout=0.0, targets="auto", train_embeddings=False) | options
    torch.manual_seed(0)
    return lora.attach_lora(model, family_of(model), **settings)


def adapted(peft_model) -> dict[str, int]:
    """Leaf name of every module carrying LoRA -> how many there are."""
    counts: dict[str, int] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A"):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


# --- target names ----------------------------------------------------------------------

def test_target_modules_reads_auto_lists_and_peft_shorthand():
    glm4, generic = detect_family({"model_type": "glm"}), detect_family({"model_type": "llama"})
    assert lora.target_modules(glm4, "auto") == list(GLM4_TARGETS)
    assert lora.target_modules(glm4, "") == list(GLM4_TARGETS)
    # a string PEFT expands itself; split into characters it would target modules named "a", "l"...
    assert lora.target_modules(generic, "auto") == "all-linear"
    assert lora.target_modules(glm4, " All-Linear ") == "all-linear"
    assert lora.target_modules(glm4, "q_proj, v_proj,,") == ["q_proj", "v_proj"]


# --- where LoRA goes, what trains ---------------------------------------------------------

@pytest.mark.parametrize("build, expected", [
    (glm, GLM4_TARGETS), (chatglm1, CHATGLM_TARGETS),
    (llama, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))])
def test_auto_targets_adapt_every_layer_and_train_nothing_else(build, expected):
    peft_model = attach(build())
    assert adapted(peft_model) == {name: LAYERS for name in expected}  # never lm_head
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)


def test_describe_targets_counts_each_kind_of_module():
    assert lora.describe_targets(attach(glm())) == ", ".join(
        f"{name} x{LAYERS}" for name in sorted(GLM4_TARGETS))


def test_named_targets_replace_the_familys():
    assert adapted(attach(glm(), targets="q_proj,v_proj")) == {"q_proj": LAYERS, "v_proj": LAYERS}


def test_a_target_the_model_lacks_is_an_error_saying_what_to_pass():
    with pytest.raises(GlmtuneError, match=r"^target_modules: .*nope_proj.*--target-modules"):
        attach(glm(), targets="nope_proj")


def test_what_trains_is_float32_on_a_bfloat16_base():
    """Updates smaller than bf16's resolution would vanish; the frozen base stays bf16 (a
    float32 copy of it would double its memory)."""
    peft_model = attach(glm().to(torch.bfloat16), train_embeddings=True)
    dtypes = {(p.requires_grad, p.dtype) for p in peft_model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


@pytest.mark.parametrize("build, names, tied", [(glm, ["embed_tokens", "lm_head"], False),
                                                (chatglm1, ["word_embeddings", "lm_head"], True)])
def test_train_embeddings_trains_copies_of_embeddings_and_head(build, names, tied):
    model = build()
    assert lora.embedding_module_names(model) == names
    original = model.get_input_embeddings().weight.detach().clone()
    peft_model = attach(model, train_embeddings=True)
    embeddings, head = peft_model.get_input_embeddings(), peft_model.get_output_embeddings()
    copies = [m.modules_to_save["default"].weight for m in (embeddings, head)]
    trained = {id(p) for name, p in peft_model.named_parameters(remove_duplicate=False)
               if p.requires_grad and ".lora_" not in name}
    assert trained == {id(c) for c in copies}
    assert not any(m.original_module.weight.requires_grad for m in (embeddings, head))
    # ChatGLM-6B ties its head to the embeddings: the trained copies must stay one matrix
    assert (copies[0] is copies[1]) == tied

    # a step moves the trained copy; the base's own matrix stays as it was
    ids = torch.tensor([[5, 6, V1_IDS["[gMASK]"], V1_IDS["<sop>"], 7, 8]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    assert not torch.equal(copies[0], original)
    assert torch.equal(embeddings.original_module.weight, original)


def test_without_train_embeddings_embeddings_and_head_stay_frozen():
    peft_model = attach(glm())
    assert not peft_model.get_input_embeddings().weight.requires_grad
    assert not peft_model.get_output_embeddings().weight.requires_grad


# --- routed experts, and PEFT's renaming of MoE targets -------------------------------------

def test_expert_parameters_only_when_asked():
    model = moe()
    family = family_of(model)
    assert lora.expert_parameters(model, family, False) is None
    assert lora.expert_parameters(model, family, True) == list(MOE_EXPERT_PARAMETERS)


def test_v5_target_names_switches_peft_renaming_off_for_moe_models_only():
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    with lora.v5_target_names(glm()):
        assert conversion.convert_peft_config_for_transformers is original
    with lora.v5_target_names(moe("glm4_moe_lite")):
        assert conversion.convert_peft_config_for_transformers is not original
    assert conversion.convert_peft_config_for_transformers is original
    # put back when what ran inside failed, or every later PEFT call in the process would skip it
    with pytest.raises(RuntimeError, match="inside"), lora.v5_target_names(moe()):
        raise RuntimeError("inside")
    assert conversion.convert_peft_config_for_transformers is original


def test_the_moe_targets_reach_dense_mlp_and_shared_experts_only_through_the_guard():
    """Why v5_target_names exists: PEFT would move gate_proj / up_proj / down_proj onto the
    routed experts. Through attach_lora the MoE GLM's own modules of those names are adapted,
    in the dense layer and the shared expert, and no routed expert is."""
    counts = adapted(attach(moe()))
    assert counts == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2,
                      "gate_proj": 2, "up_proj": 2, "down_proj": 2}


# --- adapter_config.json -------------------------------------------------------------------

VALID = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def write_config(tmp_path, config) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("config", [VALID, {**VALID, "target_modules": "all-linear"},
                                    {**VALID, "lora_alpha": 0.5}, {"peft_type": "LORA"}])
def test_a_sound_adapter_config_is_returned_as_read(tmp_path, config):
    write_config(tmp_path, config)
    assert lora.check_adapter_config(tmp_path) == config


@pytest.mark.parametrize("change, words", [
    ({"r": 0}, "r is 0, not a positive integer"),
    ({"r": 2.5}, "r is 2.5, not a positive integer"),
    ({"r": True}, "r is True, not a positive integer"),
    ({"lora_alpha": "big"}, "lora_alpha is 'big', not a number"),
    ({"lora_alpha": False}, "lora_alpha is False, not a number"),
    ({"target_modules": ["q_proj", 3]}, "target_modules is ['q_proj', 3], not a list of module names"),
    ({"target_modules": {"q_proj": 1}}, "not a list of module names")])
def test_a_broken_field_is_named_with_the_file(tmp_path, change, words):
    write_config(tmp_path, {**VALID, **change})
    with pytest.raises(GlmtuneError) as info:
        lora.check_adapter_config(tmp_path)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'adapter_config.json'}: broken adapter config: ")
    assert words in text and "(expected a JSON object like" in text


def test_every_broken_field_is_named_at_once(tmp_path):
    write_config(tmp_path, {"peft_type": "NOPE", "r": -1, "lora_alpha": None})
    with pytest.raises(GlmtuneError) as info:
        lora.check_adapter_config(tmp_path)
    assert ("peft_type 'NOPE' is not a PEFT method (e.g. LORA); r is -1, not a positive integer; "
            "lora_alpha is None, not a number") in str(info.value)


def test_a_missing_adapter_config_names_the_file(tmp_path):
    with pytest.raises(GlmtuneError, match=r"adapter_config\.json: is missing \(expected"):
        lora.check_adapter_config(tmp_path)


# --- NEFTune --------------------------------------------------------------------------------

def embedding_noise(peft_model, length: int) -> torch.Tensor:
    """What the noise hook adds to the input embeddings of one row of ``length`` tokens."""
    ids = torch.randint(0, 320, (1, length), generator=torch.Generator().manual_seed(length))
    embeddings = peft_model.get_input_embeddings()
    peft_model.eval()
    with torch.no_grad():
        clean = embeddings(ids)
    peft_model.train()
    return (embeddings(ids) - clean).detach()


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_neftune_noise_is_uniform_in_alpha_over_root_length_times_width(train_embeddings):
    peft_model = attach(glm(), train_embeddings=train_embeddings)
    lora.add_embedding_noise(peft_model, alpha=5.0)
    for length in (4, 64):
        noise = embedding_noise(peft_model, length)
        bound = 5.0 / math.sqrt(length * 64)
        # uniform in [-bound, bound]: never beyond, and with 256+ draws close to both ends
        assert noise.abs().max() <= bound * (1 + 1e-6)
        assert noise.max() > 0.9 * bound and noise.min() < -0.9 * bound
        assert noise.abs().mean() == pytest.approx(bound / 2, rel=0.15)
    # fresh each forward, not one fixed offset
    assert not torch.equal(embedding_noise(peft_model, 16), embedding_noise(peft_model, 16))


def test_neftune_leaves_evaluation_untouched_and_gradients_flowing():
    peft_model = attach(glm(), train_embeddings=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    lora.add_embedding_noise(peft_model, alpha=5.0)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)
        peft_model.train()
        assert not torch.equal(peft_model(input_ids=ids).logits, before)
    # the noise is added, not a detached copy: the trained embeddings still learn
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = peft_model.get_input_embeddings().modules_to_save["default"].weight
    assert trained.grad is not None and trained.grad[ids[0]].abs().sum() > 0
