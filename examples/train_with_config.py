"""Fine-tune from a named preset, with a few settings overridden on the command line.

    python examples/train_with_config.py --config small --epochs 2 --lora_r 8

Presets (``glmtune/plan/presets.py``, ``glmtune plan --list-presets``): small,
medium, large, fast, auto (and the CPU memory tiers). Flags given here win
over the preset; everything else keeps glmtune's defaults.
"""

from __future__ import annotations

import argparse

import common

# flag -> TrainConfig field, for the flags whose names differ from the field
FIELD = {"learning_rate": "lr"}
OWN_DIR = "models/example-preset"
OVERRIDES = ("epochs", "batch_size", "lora_r", "learning_rate", "output_dir", "model", "data",
             "max_steps", "max_samples")


def build_config(preset: str, **given):
    """The preset's settings with every flag that was given on top (flags win)."""
    from glmtune.config import TrainConfig

    return TrainConfig.from_preset(preset, {FIELD.get(k, k): v for k, v in given.items()
                                            if v is not None})


def main(argv=None) -> int:
    from glmtune.plan.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(PRESETS), default="auto", help="preset name")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--lora_r", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--output_dir", default=OWN_DIR)
    parser.add_argument("--model", help="base model (default: tiny-glm)")
    parser.add_argument("--data", default=common.DEMO_DATA)
    parser.add_argument("--max_steps", type=int, help="stop early (for tests)")
    parser.add_argument("--max_samples", type=int, help="train on the first N rows only")
    args = parser.parse_args(argv)

    from glmtune.train.recipe import train

    common.ensure_demo_data(args.data)
    # Rerunning replaces the example's own directory, never one the user named.
    config = build_config(args.config, overwrite=args.output_dir == OWN_DIR,
                          **{k: getattr(args, k) for k in OVERRIDES})
    print(f"preset {args.config}: epochs={config.epochs} batch_size={config.batch_size} "
          f"lora_r={config.lora_r} lr={config.lr} -> {config.output_dir}")
    result = train(config)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main))
