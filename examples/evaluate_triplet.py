"""Score a trained adapter on the validation triplets: precision, recall, F1, exact match.

    python examples/evaluate_triplet.py --compare_base

Same as ``glmtune eval --task triplet``; the predictions, the report and the
metrics are written to ``<adapter>/eval`` (or ``--output_dir``).
"""

from __future__ import annotations

import argparse

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="models/chatglm-lora")
    parser.add_argument("--model", help="base model (default: the adapter's)")
    parser.add_argument("--data", default=common.DEMO_VAL)
    parser.add_argument("--output_dir", help="default: <adapter>/eval")
    parser.add_argument("--compare_base", action="store_true",
                        help="also score the base model without the adapter")
    parser.add_argument("--max_samples", type=int, help="score the first N rows only")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)

    from glmtune.config import EvalConfig
    from glmtune.evaluate.run import evaluate

    common.ensure_demo_data(args.data)
    result = evaluate(EvalConfig(
        adapter=args.adapter, model=args.model, data=args.data, output_dir=args.output_dir,
        compare_base=args.compare_base, max_samples=args.max_samples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, task="triplet"))
    print(result.report)
    print(f"\nfiles in {result.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main))
