"""The hardware plan: presets by (faked) hardware, explicit flags win, memory fitting."""

from __future__ import annotations

import pytest

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.plan import make_plan, presets
from glmtune.plan.hardware import GB, Gpu, Hardware

# ChatGLM3-6B's config.json (abridged)
CHATGLM3 = {"model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "ffn_hidden_size": 13696,
            "padded_vocab_size": 65024, "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": 2, "kv_channels": 128}


def cpu(ram_gb: float, bf16: bool = True) -> Hardware:
    flags = frozenset({"avx512_bf16"}) if bf16 else frozenset()
    return Hardware(physical_cores=4, logical_cores=8, cpu_flags=flags,
                    total_ram=int(ram_gb * GB), available_ram=int(ram_gb * 0.9 * GB))


def gpu(vram_gb: float) -> Hardware:
    card = Gpu("Fake GPU", int(vram_gb * GB), int(vram_gb * GB), True)
    return Hardware(physical_cores=8, logical_cores=16, cuda_devices=1, cuda_bf16=True,
                    total_ram=64 * GB, available_ram=60 * GB, gpus=(card,))


@pytest.mark.parametrize("ram, tier", [(4, "cpu-4gb"), (8, "cpu-8gb"), (16, "cpu-16gb"),
                                       (23.9, "cpu-16gb"), (32, "cpu-32gb"), (128, "cpu-32gb")])
def test_auto_picks_the_cpu_tier_from_ram(ram, tier):
    assert presets.pick(cpu(ram))[0] == tier
    config = TrainConfig.from_preset("auto", hw=cpu(ram))
    for key, value in presets.PRESETS[tier].items():
        assert getattr(config, key) == value


@pytest.mark.parametrize("vram, name", [(8, "small"), (11.9, "small"), (16, "medium"),
                                        (24, "large"), (80, "large")])
def test_auto_picks_the_gpu_preset_from_vram(vram, name):
    assert presets.pick(gpu(vram))[0] == name


def test_every_preset_is_a_valid_config():
    for name in presets.PRESETS:
        config = TrainConfig.from_preset(name, hw=cpu(16))
        assert config.preset == name
        assert config.problems() == []


def test_explicit_settings_beat_the_preset():
    config = TrainConfig.from_preset("cpu-8gb", hw=cpu(8), batch_size=4, quant="none")
    assert config.batch_size == 4 and config.quant == "none"
    assert config.max_seq_len == 64  # still from the preset


def test_cli_preset_layering():
    from glmtune.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--preset", "cpu-4gb", "--max-seq-len", "48"])
    config = config_from_args(args, TrainConfig)
    assert config.max_seq_len == 48 and config.quant == "4bit" and config.grad_accum == 32


def test_bf16_is_detected_not_assumed():
    plan, _ = make_plan(TrainConfig(), cpu(16, bf16=False))
    assert not plan.bf16 and plan.base_dtype == "float32"
    plan, _ = make_plan(TrainConfig(), cpu(16, bf16=True))
    assert plan.bf16 and plan.base_dtype == "bfloat16"


def test_plan_shrinks_to_fit_and_says_how():
    config = TrainConfig(batch_size=8, max_seq_len=512, memory_limit=10.0)
    plan, fitted = make_plan(config, cpu(16), CHATGLM3)
    assert plan.predicted.peak <= 10 * GB
    assert fitted.batch_size * fitted.grad_accum == 8  # effective batch kept
    assert fitted.quant in ("8bit", "4bit") and fitted.gradient_checkpointing
    assert any("to fit the 10.00 GB budget" in change for change in plan.changes)


def test_plan_refuses_before_loading_with_what_would_fit():
    with pytest.raises(GlmtuneError) as info:
        make_plan(TrainConfig(memory_limit=2.0), cpu(16), CHATGLM3)
    text = str(info.value)
    assert "It would fit with MEMORY_LIMIT=" in text and "Nothing was loaded" in text


def test_tiny_memory_limit_refuses_through_the_cli(run_cli, tiny_model, triplet_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("train", "--model", tiny_model, "--data", triplet_dir / "train_triplet.jsonl",
                           "--output-dir", out, "--memory-limit", "0.2")
    assert code == 2 and "would fit with MEMORY_LIMIT=" in err
    assert not out.exists()


def test_plan_command_json(run_cli, tiny_model):
    import json

    code, out, _ = run_cli("plan", "--model", tiny_model, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["plan"]["predicted_gb"]["peak"] > 0 and data["config"]["model"] == str(tiny_model)


def test_odd_micro_batches_shrink_without_changing_the_effective_batch():
    config = TrainConfig(batch_size=3, grad_accum=2, max_seq_len=512, memory_limit=10.0)
    _, fitted = make_plan(config, cpu(16), CHATGLM3)
    assert fitted.batch_size * fitted.grad_accum == 6


def test_memory_limit_is_shared_by_processes_on_one_cpu():
    from glmtune.plan import memory_budget

    assert memory_budget(TrainConfig(memory_limit=8.0), cpu(16), processes=2) == 4 * GB
    assert memory_budget(TrainConfig(memory_limit=8.0), gpu(24), processes=2) == 8 * GB


@pytest.mark.parametrize("quant, batch, accum, ram, expected", [
    ("4bit", 1, 16, 16, (16, 1)),   # room for the whole effective batch at once
    ("4bit", 1, 16, 9, (8, 2)),     # as many as the budget holds
    ("4bit", 2, 3, 16, (2, 3)),     # an odd accumulation cannot be halved: left alone
    ("none", 1, 16, 64, (1, 16)),   # dequantization is what this saves: unquantized bases keep theirs
])
def test_quantized_cpu_runs_take_fewer_larger_micro_batches(quant, batch, accum, ram, expected):
    config = TrainConfig(quant=quant, batch_size=batch, grad_accum=accum, max_seq_len=64,
                         gradient_checkpointing=True)
    plan, fitted = make_plan(config, cpu(ram, bf16=False), CHATGLM3)
    assert (fitted.batch_size, fitted.grad_accum) == expected
    assert fitted.batch_size * fitted.grad_accum == batch * accum
    assert plan.predicted.peak <= plan.budget_bytes
    assert any("dequantized once per micro-batch" in c for c in plan.changes) == (expected != (batch, accum))
