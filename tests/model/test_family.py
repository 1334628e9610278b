import json

import pytest

from glmtune.model.family import CHATGLM_TARGETS, GLM4_TARGETS, Family, detect_family, template_override
from tests.fixtures.remote_code_model import GLM_SPECIALS, ROLE_SPECIALS, build_remote_model, build_tokenizer

# config.json keys as THUDM's checkpoints ship them (abridged).
V1 = {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384,
      "vocab_size": 130528}
V2 = {"model_type": "chatglm", "multi_query_attention": True, "multi_query_group_num": 2,
      "kv_channels": 128, "padded_vocab_size": 65024}


@pytest.fixture(scope="module")
def v2_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def v3_tokenizer():
    return build_tokenizer(specials=GLM_SPECIALS + ROLE_SPECIALS)


def test_chatglm1(v2_tokenizer):
    family = detect_family(V1, v2_tokenizer)
    # Loaded natively (no remote code), keeping THUDM's module names.
    assert family == Family("chatglm1", "chatglm1", CHATGLM_TARGETS, False)
    # Old v1 configs predate both v2 keys.
    assert detect_family({"model_type": "chatglm", "hidden_size": 4096}).name == "chatglm1"


def test_chatglm2_and_3_differ_only_by_tokenizer_or_name(v2_tokenizer, v3_tokenizer):
    # Loaded natively as GlmForCausalLM: GLM's module names, no remote code.
    assert detect_family(V2, v2_tokenizer) == Family("chatglm2", "chatglm2", GLM4_TARGETS, False)
    assert detect_family(V2).name == "chatglm2"
    assert detect_family(V2, v3_tokenizer).template == "chatglm3"
    assert detect_family(V2, None, "/models/THUDM/ChatGLM3-6B-base").name == "chatglm3"


def test_chatglm3_via_get_command():
    class SentencePieceLike:
        """ChatGLM3's tokenizer: role tokens only reachable through get_command."""
        unk_token, unk_token_id = "<unk>", 0

        def convert_tokens_to_ids(self, name):
            return 0

        def get_command(self, name):
            if name != "<|user|>":
                raise AssertionError(f"{name} is not a special token")
            return 64795

    assert detect_family(V2, SentencePieceLike()).name == "chatglm3"


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_glm4_native(model_type):
    family = detect_family({"model_type": model_type}, build_tokenizer())
    assert (family.template, family.lora_targets, family.remote_code) == ("glm4", GLM4_TARGETS, False)


def test_glm_config_object():
    from transformers import Glm4Config

    assert detect_family(Glm4Config(num_hidden_layers=1)).template == "glm4"


def test_generic(v2_tokenizer):
    assert detect_family({"model_type": "llama"}, v2_tokenizer) == Family(
        "generic", "plain", "all-linear", False)
    chat = build_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert detect_family({"model_type": "qwen2"}, chat).template == "chat_template"
    assert detect_family({"model_type": "qwen2"}).template == "plain"


def test_generic_remote_code_only_for_unknown_architectures():
    auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    assert detect_family({"model_type": "internlm2", "auto_map": auto_map}).remote_code
    # A checkpoint that still carries auto_map after transformers adopted its architecture.
    assert not detect_family({"model_type": "llama", "auto_map": auto_map}).remote_code


def test_template_override():
    family = detect_family(V2)
    assert template_override(family, "chat_template").template == "chat_template"
    assert template_override(family, "chat_template").lora_targets == GLM4_TARGETS
    # unknown names never get this far: the config refuses them, listing the valid ones
    from glmtune.config import TrainConfig

    assert any("chatglm1, chatglm2, chatglm3, glm4, glm45, chat_template, plain" in p
               for p in TrainConfig(template="alpaca").problems())


# --- a generic remote-code model ---------------------------------------------

@pytest.fixture(scope="module")
def remote_dirs(tmp_path_factory):
    return {only: build_remote_model(tmp_path_factory.mktemp("remote"), auto_model_only=only)
            for only in (False, True)}


@pytest.mark.parametrize("auto_model_only", [False, True])
def test_remote_fixture_loads_and_is_detected(remote_dirs, auto_model_only):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = remote_dirs[auto_model_only]
    loader = AutoModel if auto_model_only else AutoModelForCausalLM
    model = loader.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    family = detect_family(model.config, tokenizer, str(path))
    assert family == Family("generic", "plain", "all-linear", True)
    assert detect_family(json.loads((path / "config.json").read_text()), tokenizer) == family

    ids = torch.tensor([tokenizer.encode("你好 hello", add_special_tokens=False)])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


def test_remote_fixture_takes_lora_on_its_own_names(remote_dirs):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(remote_dirs[False], trust_remote_code=True)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=list(CHATGLM_TARGETS),
                                                  task_type="CAUSAL_LM"))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A")}
    assert wrapped == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    ids = torch.tensor([[5, 6, 7, 8]])
    peft_model(input_ids=ids, labels=ids).loss.backward()


def test_remote_fixture_refuses_without_trust(remote_dirs):
    from transformers import AutoModelForCausalLM

    # trust_remote_code=False fails at once; None would ask on stdin (see load.py).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(remote_dirs[False], trust_remote_code=False)
