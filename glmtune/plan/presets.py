"""Named presets: the two seeds' tables, as data.

- CPU memory tiers (the CPU trainer's table): quantization, sequence length,
  sample count, batch, accumulation, chosen by system RAM.
- GPU presets (the QLoRA guide's ``--config small|medium|large``): by VRAM.
- ``fast``: a quick end-to-end test.
- ``auto``: the tier or GPU preset that matches the detected hardware.

A preset only fills in settings: any option the user gives explicitly wins
(``TrainConfig.from_preset`` and the CLI layer them that way). ``glmtune plan
--list-presets`` prints this table.
"""

from __future__ import annotations

from glmtune.errors import GlmtuneError, excerpt
from glmtune.plan.hardware import GB

PRESETS: dict[str, dict[str, object]] = {
    # CPU tiers, as the CPU trainer chose them from system memory
    "cpu-4gb": {"quant": "4bit", "max_seq_len": 32, "max_samples": 30, "batch_size": 1,
                "grad_accum": 32, "gradient_checkpointing": True},
    "cpu-8gb": {"quant": "4bit", "max_seq_len": 64, "max_samples": 200, "batch_size": 1,
                "grad_accum": 16, "gradient_checkpointing": True},
    "cpu-16gb": {"quant": "8bit", "max_seq_len": 128, "max_samples": 800, "batch_size": 2,
                 "grad_accum": 8, "gradient_checkpointing": True},
    "cpu-32gb": {"quant": "none", "max_seq_len": 256, "max_samples": 2000, "batch_size": 4,
                 "grad_accum": 4},
    # GPU presets, as the QLoRA guide chose them from VRAM (QLoRA: 4-bit base)
    "small": {"quant": "4bit", "batch_size": 1, "grad_accum": 8, "lora_r": 4,
              "gradient_checkpointing": True},
    "medium": {"quant": "4bit", "batch_size": 4, "grad_accum": 2, "lora_r": 8,
               "gradient_checkpointing": True},
    "large": {"quant": "4bit", "batch_size": 8, "grad_accum": 1, "lora_r": 16},
    # a smoke test on any machine
    "fast": {"max_samples": 100, "max_steps": 20, "batch_size": 4, "grad_accum": 1,
             "max_seq_len": 128, "eval_steps": 10},
    "auto": {},
}

# (upper bound in GB, preset): the first row whose bound exceeds the memory wins
CPU_TIERS = ((6, "cpu-4gb"), (12, "cpu-8gb"), (24, "cpu-16gb"), (float("inf"), "cpu-32gb"))
GPU_TIERS = ((12, "small"), (24, "medium"), (float("inf"), "large"))

DESCRIPTIONS = {
    "cpu-4gb": "CPU, under 6 GB RAM", "cpu-8gb": "CPU, 6-12 GB RAM",
    "cpu-16gb": "CPU, 12-24 GB RAM", "cpu-32gb": "CPU, 24 GB RAM or more",
    "small": "GPU under 12 GB", "medium": "GPU 12-24 GB", "large": "GPU 24 GB or more",
    "fast": "quick end-to-end test", "auto": "pick from the detected hardware",
}


def pick(hw) -> tuple[str, str]:
    """(preset, reason) for ``auto`` on hardware ``hw``."""
    if hw.gpus:
        vram = hw.gpus[0].total_bytes / GB
        name = next(n for bound, n in GPU_TIERS if vram < bound)
        return name, f"GPU with {vram:.1f} GB -> preset {name}"
    ram = hw.total_ram / GB
    name = next(n for bound, n in CPU_TIERS if ram < bound)
    return name, f"CPU with {ram:.1f} GB RAM -> preset {name}"


def preset_overrides(name: str, hw=None) -> dict[str, object]:
    """The ``TrainConfig`` overrides of preset ``name`` (``auto`` resolved on ``hw``)."""
    if name == "none":
        return {}
    if name not in PRESETS:
        raise GlmtuneError(f"preset: unknown preset {excerpt(name)}; choose one of none, "
                           f"{', '.join(PRESETS)}")
    if name == "auto":
        if hw is None:
            from glmtune.plan.hardware import detect

            hw = detect()
        name = pick(hw)[0]
    return dict(PRESETS[name])


def table() -> str:
    keys = sorted({k for values in PRESETS.values() for k in values})
    lines = [f"{'preset':<10} {'for':<30} " + " ".join(f"{k:<14}" for k in keys)]
    for name, values in PRESETS.items():
        lines.append(f"{name:<10} {DESCRIPTIONS[name]:<30} "
                     + " ".join(f"{str(values.get(k, '-')):<14}" for k in keys))
    return "\n".join(lines)
