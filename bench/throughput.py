"""Training throughput: glmtune vs HF Trainer + PEFT on GLM-241M (`make bench`).

In one invocation: builds (once, cached by ``bench/memory.py``) a random native GLM
"GLM-241M" (hidden 1024, 16 layers, FFN 2816, vocab 32000, 16 heads, 2 KV heads,
head_dim 64), measures the fp32 and bf16 matmul peak, then LoRA-trains (r=8, alpha 16,
dropout 0, every linear layer) at sequence 256 x micro-batch 4, one warm-up step plus
``BENCH_STEPS`` (default 5) timed steps after 2 warm-up steps, each run in a fresh
process (peak RSS = its own VmHWM; speed from the median step):

  A. HF ``Trainer`` + PEFT, fp32 (what the seeds did)
  B. the same with ``bf16=True``
  C. glmtune's own path (``FineTuner``) with its defaults for this machine

on two data sets: fixed length (text rows longer than 256 tokens, so every row is
exactly 256) and variable length (the triplet set; A/B pad every row to 256 as the
seeds did, C pads as it does by default). Effective tokens/s counts non-padding tokens.

    python bench/throughput.py            # BENCH_STEPS=3 shortens it
    BENCH_COMPILE=1 python bench/throughput.py   # adds C with --compile (fixed set)
    BENCH_ISA=avx2 python bench/throughput.py    # as a CPU without bf16 / AVX-512 would run it

BENCH_ISA=avx2 caps oneDNN and MKL at AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS)
and tells glmtune the CPU has no bf16 (GLMTUNE_CPU_ISA=avx2), for every process of the
run; B (Trainer bf16) is then skipped, as nobody would pick it there, and the bound is
taken at the fp32 peak.

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import TEXT_ROW, peak_rss_gb, report, run_child  # noqa: E402
from memory import CACHE, SHAPES, build_random_glm  # noqa: E402  (bench/memory.py)

MODEL = "glm-241m"
SEQ, BATCH, WARMUP, LORA_R, LORA_ALPHA = 256, 4, 2, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
RUNS = CACHE / "runs" / "throughput"
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "GLMTUNE_CPU_ISA": "avx2"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ matmul peak
def matmul_peak(threads: int = 2, native_bf16: bool = True) -> dict:
    """Best GFLOP/s of square matmuls (2048, 4096) per dtype, ``threads`` threads. Without
    native bf16, bf16 is measured at 512 only: it runs at 1-2 GFLOP/s there (measured on an
    AVX2 EPYC), and a 4096 matmul would take minutes."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (2048, 4096) if native_bf16 or dtype == torch.float32 else (512,):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            for _ in range(2):
                a @ b
            reps, started = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - started < 1.0:
                a @ b
                reps += 1
            gflops = 2 * n**3 * reps / (time.perf_counter() - started) / 1e9
            out[f"{str(dtype)[6:]}_{n}"] = round(gflops, 1)
            best = max(best, gflops)
        out[str(dtype)[6:]] = round(best, 1)
    return out


def linear_params(model_dir: Path) -> int:
    """N: parameters in the base model's Linear layers (LM head included)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# ------------------------------------------------------------------ children
def child_hf(spec: dict) -> dict:
    """A/B: HF Trainer + PEFT on the given token ids, every row padded to SEQ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    rows = json.loads(Path(spec["rows"]).read_text())
    pad = spec["pad_id"]

    def padded(row):  # padding="max_length", as the seeds did
        n = len(row["input_ids"])
        return {"input_ids": row["input_ids"] + [pad] * (SEQ - n),
                "attention_mask": [1] * n + [0] * (SEQ - n),
                "labels": row["labels"] + [-100] * (SEQ - n)}

    data = [padded(r) for r in rows]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    timer = Timer()
    args = TrainingArguments(output_dir=spec["out"], use_cpu=True, per_device_train_batch_size=BATCH,
                             max_steps=WARMUP + spec["steps"], report_to=[], save_strategy="no",
                             logging_strategy="no", bf16=spec["bf16"], learning_rate=2e-3,
                             disable_tqdm=True, seed=42)
    Trainer(model=model, args=args, train_dataset=Data(), data_collator=default_data_collator,
            callbacks=[timer]).train()
    times = timer.times[WARMUP:]
    step = statistics.median(times)
    # every step has the same shape (BATCH x SEQ); its real tokens average the data set's
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return {"step_s": [round(t, 3) for t in times], "threads": torch.get_num_threads(),
            "tok_s": round(BATCH * SEQ / step, 1), "eff_tok_s": round(BATCH * mean_len / step, 1),
            "rss_gb": round(peak_rss_gb(), 3)}


def child_glmtune(spec: dict) -> dict:
    """C: glmtune's FineTuner with its defaults; step times from its metrics.jsonl."""
    import torch

    from glmtune.config import TrainConfig
    from glmtune.train.recipe import FineTuner

    steps = WARMUP + spec["steps"]
    config = TrainConfig(model=spec["model"], data=spec["data"], val_data="", batch_size=BATCH,
                         max_seq_len=SEQ, lora_r=LORA_R, max_steps=steps, logging_steps=1,
                         train_embeddings="false", output_dir=spec["out"], overwrite=True,
                         save_steps=10_000, compile=spec.get("compile", False),
                         packing=spec.get("packing", False))
    tuner = FineTuner(config)
    tuner.train()
    cfg = tuner.config  # as planned for this machine
    records = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    # each record counts the non-padding input tokens of its step
    timed = records[WARMUP:]
    times = [r["tokens"] / r["tokens_per_s"] for r in timed]
    # fixed set: every step holds the same tokens, so the median step is the rate; on the
    # variable set steps differ in size, and only the whole run's tokens / time is fair
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    eff_tok_s = sum(r["tokens"] for r in timed) / sum(times)
    return {"step_s": [round(t, 3) for t in times], "threads": torch.get_num_threads(),
            "tok_s": round(tok_s, 1), "eff_tok_s": round(eff_tok_s, 1),
            "first_step_s": round(records[0]["tokens"] / records[0]["tokens_per_s"], 1),
            "plan": tuner.plan.describe(), "bf16": bool(tuner.plan.bf16),
            "predicted_step_s": round(tuner.plan.step_time.seconds, 3) if tuner.plan.step_time else None,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "rss_gb": round(peak_rss_gb(), 3)}


# ------------------------------------------------------------------ data
def tokenized(model_dir: Path, data: Path) -> tuple[list[dict], int]:
    """glmtune's own tokenization of ``data`` (ids + loss labels), shared with A/B."""
    from glmtune.config import TrainConfig
    from glmtune.train.recipe import FineTuner

    tuner = FineTuner(TrainConfig(model=str(model_dir), data=str(data), val_data="",
                                  batch_size=BATCH, max_seq_len=SEQ, lora_r=LORA_R,
                                  train_embeddings="false", output_dir=str(RUNS / "unused")))
    tuner.prepare_datasets()
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in tuner.train_set.rows]
    return rows, tuner.tokenizer.pad_token_id


def write_data() -> dict[str, Path]:
    from glmtune.data import triplets

    RUNS.mkdir(parents=True, exist_ok=True)
    fixed = RUNS / "fixed.txt"
    fixed.write_text((TEXT_ROW + "\n") * 64, "utf-8")
    train, _ = triplets.generate(n_train=900)
    variable = RUNS / "triplets.jsonl"
    variable.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), "utf-8")
    return {"fixed": fixed, "variable": variable}


# ------------------------------------------------------------------ main
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        report((child_hf if sys.argv[2] == "hf" else child_glmtune)(json.loads(sys.argv[3])))
        return 0
    avx2 = os.environ.get("BENCH_ISA") == "avx2"
    if avx2:
        os.environ.update(AVX2_ENV)  # before torch loads here, and inherited by every child
    steps = int(os.environ.get("BENCH_STEPS", 5))
    started = time.perf_counter()
    import torch
    import transformers

    from glmtune.plan import hardware

    native_bf16 = hardware.detect().bf16
    model_dir = build_random_glm(MODEL)
    n_linear = linear_params(model_dir)
    print(f"GLM-241M {SHAPES[MODEL]} at {model_dir}: {n_linear / 1e6:.1f} M parameters in Linear layers",
          flush=True)
    peak = matmul_peak(threads=2, native_bf16=native_bf16 and not avx2)
    print(f"matmul peak (2 threads, GFLOP/s): {peak}", flush=True)

    results: dict[str, dict] = {}
    for scenario, path in write_data().items():
        rows, pad_id = tokenized(model_dir, path)
        ids_file = RUNS / f"{scenario}.ids.json"
        ids_file.write_text(json.dumps(rows))
        mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
        print(f"== {scenario}: {len(rows)} rows, mean {mean_len:.1f} tokens (max {SEQ})", flush=True)
        runs = [("A", "hf", {"bf16": False}), ("B", "hf", {"bf16": True}),
                ("C", "glmtune", {"data": str(path)})]
        if avx2 or not native_bf16:  # nobody would pick Trainer bf16 there
            runs.pop(1)
        if scenario == "variable":
            runs.append(("C+packing", "glmtune", {"data": str(path), "packing": True}))
        if os.environ.get("BENCH_COMPILE") == "1" and scenario == "fixed":
            runs.append(("C+compile", "glmtune", {"data": str(path), "compile": True}))
        for name, kind, extra in runs:
            spec = dict(model=str(model_dir), steps=steps, out=str(RUNS / f"{scenario}-{name}"),
                        rows=str(ids_file), pad_id=pad_id, **extra)
            results[f"{scenario}-{name}"] = r = run_child(__file__, kind, json.dumps(spec))
            if "failed" in r:
                raise SystemExit(f"{name} run failed (exit {r['failed']})")
            print(f"   {name}: {r['tok_s']:.0f} tok/s, {r['eff_tok_s']:.0f} effective, "
                  f"RSS {r['rss_gb']:.2f} GB, steps {r['step_s']}", flush=True)
            if name == "C+compile":
                print(f"      first step (compiling) {r['first_step_s']} s", flush=True)
            if "plan" in r:
                print("      plan: " + r["plan"].replace("\n", "\n      "), flush=True)

    f, v = (lambda k: results[f"fixed-{k}"]), (lambda k: results[f"variable-{k}"])
    kinds = [k for k in "ABC" if f"fixed-{k}" in results]
    # the bound is taken at the peak of the dtype glmtune computes in on this machine
    dtype = "bfloat16" if f("C")["bf16"] else "float32"
    bound = peak[dtype] * 1e9
    frac = {k: 4 * n_linear * f(k)["tok_s"] / bound for k in kinds}
    names = {"A": "HF Trainer + PEFT, fp32", "B": "HF Trainer + PEFT, bf16", "C": "glmtune (defaults)"}
    fastest = max((k for k in kinds if k != "C"), key=lambda k: f(k)["tok_s"])
    print()
    print(f"GLM-241M LoRA r={LORA_R}, {BATCH} x {SEQ}, {WARMUP} warm-up + {steps} timed steps (median), "
          f"{_cpu_name()}, {os.cpu_count()} cores{', capped at AVX2 without bf16' if avx2 else ''}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"matmul peak: bf16 {peak['bfloat16']:.0f} GFLOP/s, fp32 {peak['float32']:.0f} GFLOP/s; "
          f"glmtune computes in {dtype}: 4·N·T bound {bound / (4 * n_linear):.0f} tok/s")
    print(f"| run | fixed tok/s | vs A | % of {dtype} bound | peak RSS GB | variable eff. tok/s | vs A |")
    print("|---|---|---|---|---|---|---|")
    for k in kinds:
        print(f"| {k}. {names[k]} | {f(k)['tok_s']:.0f} | {f(k)['tok_s'] / f('A')['tok_s']:.2f}× "
              f"| {100 * frac[k]:.1f} % | {f(k)['rss_gb']:.2f} | {v(k)['eff_tok_s']:.0f} "
              f"| {v(k)['eff_tok_s'] / v('A')['eff_tok_s']:.2f}× |")
    packed = results.get("variable-C+packing")
    if packed:
        print(f"packing (variable set): C {v('C')['eff_tok_s']:.0f} -> {packed['eff_tok_s']:.0f} effective "
              f"tok/s ({packed['eff_tok_s'] / v('C')['eff_tok_s']:.2f}×)")
    measured_step = statistics.median(f("C")["step_s"])
    if f("C").get("predicted_step_s"):
        print(f"plan's predicted step (fixed set, C): {f('C')['predicted_step_s']:.3f} s, measured median "
              f"{measured_step:.3f} s ({100 * (f('C')['predicted_step_s'] / measured_step - 1):+.0f} %)")
    result = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "isa_cap": "avx2" if avx2 else None,
        "steps": steps, "warmup": WARMUP, "n_linear": n_linear,
        "peak_gflops_bf16": peak["bfloat16"], "peak_gflops_fp32": peak["float32"], "bound_dtype": dtype,
        **{f"tok_s_{k}": f(k)["tok_s"] for k in kinds},
        **{f"ratio_C_{k}": round(f("C")["tok_s"] / f(k)["tok_s"], 3) for k in kinds if k != "C"},
        "ratio_C_fastest_baseline": round(f("C")["tok_s"] / f(fastest)["tok_s"], 3),
        "peak_frac_C": round(frac["C"], 4),
        **{f"rss_{k}": f(k)["rss_gb"] for k in kinds},
        "rss_ratio_C_fastest_baseline": round(f("C")["rss_gb"] / f(fastest)["rss_gb"], 3),
        **{f"eff_tok_s_{k}": v(k)["eff_tok_s"] for k in kinds},
        **{f"eff_ratio_C_{k}": round(v("C")["eff_tok_s"] / v(k)["eff_tok_s"], 3)
           for k in kinds if k != "C"},
        **({"tok_s_C_compile": f("C+compile")["tok_s"],
            "compile_first_step_s": f("C+compile")["first_step_s"]} if "fixed-C+compile" in results else {}),
        "eff_tok_s_C_packing": packed["eff_tok_s"] if packed else None,
        "predicted_step_s_C": f("C").get("predicted_step_s"), "measured_step_s_C": measured_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
