"""Planning the MoE GLMs from their published config.json alone (no weights): memory per
device on one GPU, on 8 GPUs with FSDP / ZeRO-3, and on a CPU; refusals that say what fits."""

from __future__ import annotations

import json

import pytest

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.model import load
from glmtune.plan import estimate as est
from glmtune.plan import plan_for_model
from glmtune.plan.hardware import GB, Gpu, Hardware
from tests.fixtures.glm_configs import GLM_45_AIR, GLM_46, GLM_47_FLASH

MODELS = {"GLM-4.5-Air": GLM_45_AIR, "GLM-4.6": GLM_46, "GLM-4.7-Flash": GLM_47_FLASH}
# one long row at a time, as a big model is trained
RUN = dict(batch_size=1, max_seq_len=1024, gradient_checkpointing=True, lora_r=16)


def gpus(vram_gb: float, count: int) -> Hardware:
    card = Gpu("Fake GPU", int(vram_gb * GB), int(vram_gb * GB), True)
    return Hardware(physical_cores=64, logical_cores=128, cuda_devices=count, cuda_bf16=True,
                    total_ram=1024 * GB, available_ram=1000 * GB, gpus=(card,) * count)


def cpu(ram_gb: float) -> Hardware:
    return Hardware(physical_cores=32, logical_cores=64, cpu_flags=frozenset({"avx512_bf16"}),
                    total_ram=int(ram_gb * GB), available_ram=int(ram_gb * 0.95 * GB))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Directories holding only config.json, as after downloading just the config."""
    dirs = {}
    for name, config in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        (path / "config.json").write_text(json.dumps(config))
        dirs[name] = path
    return dirs


def plan(model_dirs, name, hw, processes=1, **settings):
    config = TrainConfig(model=str(model_dirs[name]), **{**RUN, **settings})
    return plan_for_model(config, hw, load.resolve(config.model), processes=processes)


def test_shapes_count_every_expert():
    """Total parameters as published: 106 B (Air), 355 B (4.6), 30 B (4.7-Flash)."""
    totals = {name: est.shape_from_config(c).total_params / 1e9 for name, c in MODELS.items()}
    assert totals == {"GLM-4.5-Air": pytest.approx(106, abs=1.5),
                      "GLM-4.6": pytest.approx(355, abs=3),
                      "GLM-4.7-Flash": pytest.approx(30, abs=0.5)}
    flash = est.shape_from_config(GLM_47_FLASH)
    assert (flash.moe_layers, flash.experts, flash.experts_per_token, flash.kv_lora_rank) == (
        46, 64, 4, 512)


def test_activations_follow_the_active_experts_not_all():
    """Activations grow with the experts that run per token (8 + 1 shared), not all 128."""
    shape = est.shape_from_config(GLM_45_AIR)
    assert shape.active_intermediate == 10944 + 45 * 1408 * (8 + 1)
    settings = est.Settings(base_dtype="bfloat16", seq_len=1024, device="cuda")
    all_run = est.Shape(**{**shape.__dict__, "experts_per_token": shape.experts})
    extra = est.estimate(all_run, settings).activations - est.estimate(shape, settings).activations
    assert extra == 1024 * 2 * est._ACT_PER_INTERMEDIATE * 45 * 1408 * (128 - 8)
    assert est.estimate(shape, settings).weights == est.estimate(all_run, settings).weights


def test_one_80gb_gpu_fits_flash_but_refuses_air_saying_how_it_would_fit(model_dirs):
    the_plan, fitted, _ = plan(model_dirs, "GLM-4.7-Flash", gpus(80, 1))
    assert fitted.quant == "none" and the_plan.predicted.peak <= 80 * GB
    assert any("64 routed experts" in r for r in the_plan.reasons)
    with pytest.raises(GlmtuneError) as info:
        plan(model_dirs, "GLM-4.5-Air", gpus(80, 1))
    text = str(info.value)
    assert "Nothing was loaded" in text and "It would fit with MEMORY_LIMIT=" in text
    assert "sharded over 4 devices of this size (--strategy fsdp or zero3" in text


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_eight_gpus_with_sharding_fit_air_and_split_its_weights(model_dirs, strategy):
    air, fitted, _ = plan(model_dirs, "GLM-4.5-Air", gpus(80, 8), processes=8, strategy=strategy)
    assert fitted.quant == "none"  # bf16 weights, split 8 ways
    shape = est.shape_from_config(GLM_45_AIR)
    bf16_total = shape.total_params * 2
    # each device holds 1/8 of the weights plus the one layer being gathered
    assert bf16_total / 8 < air.predicted.weights < bf16_total / 8 + 2 * shape.layer_weight_params() + GB
    assert air.predicted.peak <= 80 * GB
    assert any(f"{strategy} splits weights" in r for r in air.reasons)


def test_glm46_needs_more_than_eight_80gb_cards(model_dirs):
    """GLM-4.6 (355 B, 670 GB of routed experts in bf16) does not fit 8 x 80 GB even at 4-bit:
    bitsandbytes shrinks only the Linear layers. The refusal names 16 cards; 8 x 141 GB fit."""
    with pytest.raises(GlmtuneError) as info:
        plan(model_dirs, "GLM-4.6", gpus(80, 8), processes=8, strategy="fsdp")
    text = str(info.value)
    assert "quant 4bit" in text  # 8-bit is skipped: it cannot be sharded
    assert "sharded over 16 devices of this size (--strategy fsdp" in text
    the_plan, fitted, _ = plan(model_dirs, "GLM-4.6", gpus(141, 8), processes=8, strategy="zero3")
    assert fitted.quant == "none" and the_plan.predicted.peak <= 141 * GB


def test_cpu_plan_and_refusal(model_dirs):
    flash, _, _ = plan(model_dirs, "GLM-4.7-Flash", cpu(128))
    assert flash.device == "cpu" and flash.base_dtype == "bfloat16"
    assert flash.predicted.peak <= flash.budget_bytes
    # no weights to read the largest tensor from: one layer's fused experts, in bf16
    assert flash.predicted.load_transient == 2 * 64 * 2 * 1536 * 2048
    with pytest.raises(GlmtuneError, match="sharded over 2 machines of this size"):
        plan(model_dirs, "GLM-4.5-Air", cpu(128))


def test_lora_experts_costs_optimizer_memory(model_dirs):
    base, _, _ = plan(model_dirs, "GLM-4.7-Flash", gpus(80, 1))
    experts, _, _ = plan(model_dirs, "GLM-4.7-Flash", gpus(80, 1), lora_experts=True)
    # rank 16 on 46 x 64 experts: 16 x 46 x 64 x (2048 + 3072 + 1536 + 2048) params, 16 bytes each
    assert experts.predicted.trainable - base.predicted.trainable == 16 * 16 * 46 * 64 * (
        2048 + 2 * 1536 + 1536 + 2048)


def test_plan_command_on_a_config_only_directory(run_cli, model_dirs):
    code, out, _ = run_cli("plan", "--model", model_dirs["GLM-4.7-Flash"], "--json",
                           "--memory-limit", "200", "--max-seq-len", "512", "--batch-size", "1")
    assert code == 0
    data = json.loads(out)
    assert data["plan"]["predicted_gb"]["weights"] > 50  # 30 B parameters in bf16 or float32
    code, _, err = run_cli("plan", "--model", model_dirs["GLM-4.6"], "--memory-limit", "64",
                           "--strategy", "fsdp", "--processes", "2")
    assert code == 2 and "sharded over" in err and "Nothing was loaded" in err
    code, _, err = run_cli("plan", "--model", model_dirs["GLM-4.6"], "--processes", "0")
    assert code == 2 and "processes: must be a positive integer" in err
