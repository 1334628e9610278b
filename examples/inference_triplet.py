"""Extract (subject, relation, object) triplets from sentences with a trained adapter.

    python examples/inference_triplet.py --text "华为公司的总部位于深圳。"

Without ``--text`` a few demo sentences are used. The prompt is the one the
training data uses, so the adapter sees what it was trained on.
"""

from __future__ import annotations

import argparse

import common

DEMO_SENTENCES = [
    "苹果公司是一家美国的科技公司。",
    "马云创立了阿里巴巴集团，总部位于杭州。",
    "今天天气很好，我们去公园散步。",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="models/chatglm-lora")
    parser.add_argument("--model", help="base model (default: the adapter's)")
    parser.add_argument("--text", action="append", help="a sentence (repeat for more)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)

    from glmtune.config import PredictConfig
    from glmtune.data.triplets import INSTRUCTION
    from glmtune.evaluate.triplet import parse_triplets
    from glmtune.infer.predict import Predictor

    predictor = Predictor(PredictConfig(adapter=args.adapter, model=args.model,
                                        max_new_tokens=args.max_new_tokens, out=None))
    sentences = args.text or DEMO_SENTENCES
    answers = predictor.generate_batch([INSTRUCTION.format(text=s) for s in sentences])
    for sentence, answer in zip(sentences, answers):
        print(f"text:     {sentence}")
        print(f"answer:   {answer}")
        found = parse_triplets(answer)
        print("triplets: " + ("; ".join(f"({s}, {r}, {o})" for s, r, o in found) or "none"))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main))
