"""Fine-tune with a configuration written in Python: no YAML file, no flags to remember.

    python examples/train_pure_python.py

The settings below are the whole recipe; edit them here. The few flags exist
so a test (or a curious user) can point the run elsewhere or cut it short:
``--model``, ``--data``, ``--output_dir``, ``--max_steps``.
"""

from __future__ import annotations

import argparse

import common

OWN_DIR = "models/example-pure-python"


def build_config(model: str, data: str, output_dir: str, max_steps: int | None):
    from glmtune.config import TrainConfig

    return TrainConfig(
        model=model,               # 'tiny-glm', a local HF directory, or a hub id
        data=data,                 # prompt/response JSONL; the val_* sibling is used for validation
        output_dir=output_dir,
        overwrite=output_dir == OWN_DIR,  # rerunning replaces only the example's own directory
        epochs=3,
        batch_size=8,
        lr=2e-3,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        max_seq_len=256,
        max_steps=max_steps,
        seed=42,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-glm")
    parser.add_argument("--data", default=common.DEMO_DATA)
    parser.add_argument("--output_dir", default=OWN_DIR)
    parser.add_argument("--max_steps", type=int, default=None, help="stop early (for tests)")
    args = parser.parse_args(argv)

    from glmtune.train.recipe import train

    common.ensure_demo_data(args.data)
    config = build_config(args.model, args.data, args.output_dir, args.max_steps)
    result = train(config)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main))
