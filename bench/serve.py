"""Serving throughput: `glmtune serve` under 1, 4 and 16 concurrent clients vs sequential
`glmtune predict` (``Predictor``), in one invocation.

tiny-glm (built once into bench/cache/) with a random LoRA adapter of the default job's
shape (tests/fixtures/random_adapter.py: LoRA on every projection plus trained embeddings and
LM head). The requests are the default job's triplet-extraction prompts, greedy, at most
``BENCH_TOKENS`` (default 32) new tokens each; ``BENCH_REQUESTS`` (default 32) of them per
setting; float32 unless ``BENCH_BF16=true`` (under bf16 serve does not batch by default);
``BENCH_THREADS`` sets the CPU threads of both sides. First the baseline answers them one by one in this process (one model load, as
`glmtune predict --file` does, so loading is not counted against it), then the server runs
in a child process with the same settings (threads, bf16) and the official openai client
sends the same requests from N threads. Completion tokens are the `usage` the server reports
and the tokens the baseline generated (the same count for the same greedy answer).

    python bench/serve.py

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "32"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "32"))
# float32 by default: there batched answers equal one-at-a-time ones and serve batches
BF16 = os.environ.get("BENCH_BF16", "false")
# CPU threads of both sides (default: physical cores, glmtune's default)
THREADS = os.environ.get("BENCH_THREADS") or None
CLIENTS = (1, 4, 16)


def prompts(n: int) -> list[str]:
    from glmtune.data.triplets import generate

    _, rows = generate(n_train=1, n_val=n, seed=5)
    return [row["prompt"] for row in rows]


def models() -> tuple[Path, Path]:
    from glmtune.model import tiny_glm
    from tests.fixtures.random_adapter import build_random_adapter

    base = tiny_glm.build(HERE / "cache" / "tiny-glm")
    adapter = HERE / "cache" / "serve-adapter"
    if not (adapter / "adapter_config.json").is_file():
        build_random_adapter(base, adapter, seed=0, rank=16)
    return base, adapter


def sequential(base: Path, adapter: Path, questions: list[str]) -> dict:
    from glmtune.config import PredictConfig
    from glmtune.infer.predict import Predictor, Sampling

    predictor = Predictor(PredictConfig(adapter=str(adapter), model=str(base), bf16=BF16,
                                        threads=THREADS and int(THREADS)))
    sampling = Sampling(max_new_tokens=TOKENS)
    predictor.run([predictor.prompt_ids(questions[0])], [sampling])  # warm-up
    started = time.perf_counter()
    tokens = sum(predictor.run([predictor.prompt_ids(q)], [sampling])[0].completion_tokens
                 for q in questions)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "requests_per_s": len(questions) / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens,
            "bf16": predictor.bf16, "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def serve(base: Path, adapter: Path, questions: list[str], log: Path) -> dict:
    from openai import APIConnectionError, OpenAI

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GLMTUNE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--adapter",
                                 f"bench={adapter}", "--model", str(base), "--port", str(port),
                                 "--queue-size", "64", "--bf16", BF16,
                                 *(["--threads", THREADS] if THREADS else [])], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                    timeout=600)

    def ask(question: str) -> int:
        reply = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": question}],
            max_tokens=TOKENS, temperature=0)
        return reply.usage.completion_tokens

    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except APIConnectionError:  # not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start:\n{log.read_text()}") from None
                time.sleep(0.5)
        ask(questions[0])  # warm-up
        results = {}
        for clients in CLIENTS:
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(ask, questions))
            seconds = time.perf_counter() - started
            results[clients] = {"seconds": seconds, "requests_per_s": len(questions) / seconds,
                                "tokens_per_s": tokens / seconds, "tokens": tokens}
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> None:
    questions = prompts(REQUESTS)
    base, adapter = models()
    print(f"{REQUESTS} requests, at most {TOKENS} new tokens each, greedy; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
          flush=True)
    baseline = sequential(base, adapter, questions)
    print(f"sequential Predictor (glmtune predict): {baseline['requests_per_s']:.2f} req/s, "
          f"{baseline['tokens_per_s']:.1f} tokens/s (bf16 {baseline['bf16']}, "
          f"{baseline['threads']} threads)", flush=True)
    served = serve(base, adapter, questions, HERE / "cache" / "serve-bench.log")
    print("\n| clients | req/s | tokens/s | vs sequential predict |\n|---|---|---|---|")
    print(f"| predict, one by one | {baseline['requests_per_s']:.2f} | "
          f"{baseline['tokens_per_s']:.1f} | 1.00x |")
    for clients, row in served.items():
        ratio = row["tokens_per_s"] / baseline["tokens_per_s"]
        print(f"| serve, {clients} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{ratio:.2f}x |")
    print("RESULT " + json.dumps({"requests": REQUESTS, "max_tokens": TOKENS,
                                  "sequential": baseline, "serve": served}))


if __name__ == "__main__":
    main()
