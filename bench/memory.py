"""Peak memory of real LoRA runs against the planner's prediction (`make bench-memory`).

Builds (once, cached under bench/cache/, outside git) random-weight GLMs with
ChatGLM3-6B's shape and (``moe-flash-4bit``) GLM-4.7-Flash's mixture-of-experts layers,
written straight to 1 GB safetensors shards so building never holds the model in memory
-- and ChatGLM3-6B's shape in THUDM's original layout (``pytorch_model-0000N-of-0000M.bin``
pickles, THUDM's tensor names and config.json, loaded natively and converted while
loading) -- then trains a few steps in a fresh process
per configuration and compares the process's peak RSS (loading included) with
what ``glmtune plan`` predicted before loading.

    python bench/memory.py [--only NAME ...] [--steps 3]

Last line: ``RESULT {json}`` with quant, peak_rss_gb, predicted_gb, s_per_step per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import TEXT_ROW, peak_rss_gb, report, run_child  # noqa: E402

CACHE = Path(os.environ.get("GLMTUNE_BENCH_CACHE", HERE / "cache"))
SHARD_BYTES = 1 << 30

SHAPES = {
    # ChatGLM3-6B: hidden 4096, 28 layers, FFN 13696, vocab 65024, 32 heads, 2 KV groups
    "glm-6b": dict(hidden_size=4096, num_hidden_layers=28, intermediate_size=13696,
                   vocab_size=65024, num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    # the throughput issue's GLM-241M
    "glm-241m": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
                     vocab_size=32000, num_attention_heads=16, num_key_value_heads=2, head_dim=64),
    "glm-660m": dict(hidden_size=2048, num_hidden_layers=12, intermediate_size=5632,
                     vocab_size=32000, num_attention_heads=16, num_key_value_heads=2, head_dim=128),
    # GLM-4.7-Flash's layers (MLA ranks 768 / 512, 64 routed experts of 1536 of which 4 run per
    # token, 1 shared, first layer dense) with 6 of its 47 layers and a 32k vocabulary: 3.2 B
    # parameters, 3.0 B of them routed experts, which 4-bit quantization leaves in bf16
    "flash-6l": dict(model_type="glm4_moe_lite", hidden_size=2048, num_hidden_layers=6,
                     intermediate_size=10240, vocab_size=32000, num_attention_heads=20,
                     num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
                     qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                     moe_intermediate_size=1536, n_routed_experts=64, num_experts_per_tok=4,
                     n_shared_experts=1, mlp_layer_types=["dense"] + ["sparse"] * 5),
}
# ChatGLM3-6B's matrices in 6 of its layers: small enough to train unquantized (7 GB of
# float32) beside its 4-bit twin, at the same tokens per step
SHAPES["glm-6b-6l"] = dict(SHAPES["glm-6b"], num_hidden_layers=6)

# name -> (model, quant, batch, seq, gradient checkpointing)
RUNS = {
    "6b-4bit": ("glm-6b", "4bit", 1, 128, True),
    "6b-bf16": ("glm-6b", "none", 1, 128, True),
    # ChatGLM3-6B as published: .bin shards, converted while loading (target: peak <= 8 GB)
    "chatglm3-6b-bin-4bit": ("chatglm3-6b-bin", "4bit", 1, 128, True),
    "tiny-default": ("tiny-glm", "none", 16, 128, False),
    "241m-bf16": ("glm-241m", "none", 4, 256, False),
    "660m-4bit": ("glm-660m", "4bit", 2, 128, True),
    "moe-flash-4bit": ("flash-6l", "4bit", 1, 256, True),
    "6b-6l-4bit": ("glm-6b-6l", "4bit", 1, 128, True),
    "6b-6l-none": ("glm-6b-6l", "none", 1, 128, True),
    "660m-none": ("glm-660m", "none", 2, 128, True),
}
# what a quantized step costs over the unquantized one, same shapes and tokens per step
QUANT_PAIRS = {"6b-6l": ("6b-6l-4bit", "6b-6l-none"), "660m": ("660m-4bit", "660m-none")}


def build_random_glm(name: str) -> Path:
    """A GLM directory (``glm`` unless the shape names another model_type) with random bf16
    weights, written shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from glmtune.model import tiny_glm

    path = CACHE / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = CACHE / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = tiny_glm.build(CACHE / "tiny-glm")
    shape = dict(SHAPES[name])
    config = CONFIG_MAPPING[shape.pop("model_type", "glm")](
        **shape, pad_token_id=0, eos_token_id=0, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        shapes = {n: (p.shape, p.dim()) for n, p in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    index, shard, shard_size, count, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, count
        if shard:
            count += 1
            file = f"model-{count:05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            index.update({n: file for n in shard})
            shard, shard_size = {}, 0

    for pname, (shape, dim) in shapes.items():
        if dim == 1:  # norms and biases
            tensor = torch.ones(shape, dtype=torch.bfloat16) if "norm" in pname else torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size = tensor.numel() * 2
        if shard_size + size > SHARD_BYTES:
            flush()
        shard[pname] = tensor
        shard_size += size
        total += size
    flush()
    config.save_pretrained(tmp)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (tmp / file.name).write_bytes(file.read_bytes())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}))
    tmp.rename(path)
    return path


# ChatGLM3-6B's config.json sizes
CHATGLM3_6B = dict(hidden_size=4096, num_layers=28, ffn_hidden_size=13696, kv_channels=128,
                   num_attention_heads=32, padded_vocab_size=65024)


def build_chatglm3_bin(name: str = "chatglm3-6b-bin", sizes: dict | None = None) -> Path:
    """ChatGLM3-6B's published layout with random fp16 weights, one .bin shard in memory at a time."""
    import torch
    from transformers import GlmForCausalLM

    from glmtune.model.chatglm import convert
    from tests.fixtures.chatglm_layout import (
        config_json,
        tokenizer_config_json,
        train_sentencepiece,
        write_stand_ins,
    )

    path = CACHE / name
    if (path / "pytorch_model.bin.index.json").is_file():
        return path
    tmp = CACHE / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    config = {**config_json(3, 65024), **(sizes or CHATGLM3_6B)}
    with torch.device("meta"):
        glm = convert.glm_config(config)
        state = GlmForCausalLM(glm).state_dict()
    shapes = {n: t.shape for n, t in convert.to_original(state).items()}
    shapes["transformer.rotary_pos_emb.inv_freq"] = torch.Size([config["kv_channels"] // 4])
    generator = torch.Generator().manual_seed(0)
    files: list[list[str]] = [[]]
    size = 0
    for pname, shape in shapes.items():  # plan shards of about SHARD_BYTES
        nbytes = 2 * torch.Size(shape).numel()
        if files[-1] and size + nbytes > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1].append(pname)
        size += nbytes
    index, total = {}, 0
    for i, names in enumerate(files, 1):
        file = f"pytorch_model-{i:05d}-of-{len(files):05d}.bin"
        shard = {}
        for pname in names:
            shape = shapes[pname]
            if len(shape) == 1:
                shard[pname] = (torch.ones(shape) if "norm" in pname else
                                torch.zeros(shape)).to(torch.float16)
            else:
                shard[pname] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
            index[pname] = file
            total += shard[pname].numel() * 2
        torch.save(shard, tmp / file)
        del shard
    (tmp / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(3)))
    train_sentencepiece(tmp / "tokenizer.model")
    write_stand_ins(tmp, 3)
    tmp.rename(path)
    return path


def child(spec: dict) -> dict:
    """One run in this (fresh) process: plan, load, train, report peak RSS."""
    from glmtune.config import TrainConfig
    from glmtune.train.recipe import FineTuner

    data = Path(spec["out"]) / "data.txt"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text((TEXT_ROW + "\n") * 64, "utf-8")
    config = TrainConfig(model=spec["model"], data=str(data), val_data="", output_dir=spec["out"] + "/run",
                         quant=spec["quant"], batch_size=spec["batch"], max_seq_len=spec["seq"],
                         gradient_checkpointing=spec["ckpt"], max_steps=spec["steps"], lora_r=8,
                         logging_steps=1, overwrite=True, train_embeddings="false",
                         save_steps=10_000)
    tuner = FineTuner(config)
    tuner.prepare_datasets()
    predicted = tuner.plan.predicted
    started = time.perf_counter()
    tuner.setup_model_and_tokenizer()
    load_peak = peak_rss_gb()
    tuner.train()
    records = [json.loads(x) for x in (Path(spec["out"]) / "run" / "metrics.jsonl").read_text().splitlines()]
    step_times = [spec["batch"] * spec["seq"] / r["tokens_per_s"] for r in records if "loss" in r][1:]
    peak = peak_rss_gb()
    speed = _speed(tuner, spec, step_times)
    return {"quant": spec["quant"], "planned_quant": tuner.plan.quant, "peak_rss_gb": round(peak, 3),
            **speed,
            "predicted_gb": round(predicted.peak / 2**30, 3),
            "error": round(predicted.peak / 2**30 / peak - 1, 3),
            "load_peak_gb": round(load_peak, 3), "predicted_load_gb": round(predicted.load_peak / 2**30, 3),
            "predicted_train_gb": round(predicted.train_peak / 2**30, 3),
            "s_per_step": round(sum(step_times) / max(len(step_times), 1), 2),
            "predicted_s_per_step": round(tuner.plan.step_time.seconds, 2) if tuner.plan.step_time else None,
            "seconds": round(time.perf_counter() - started, 1)}


def _speed(tuner, spec: dict, step_times: list[float]) -> dict:
    """Tokens/s, per core, and as a share of the 4·N·T bound at this machine's square-matmul
    peak in the compute dtype (measured after training, in this process)."""
    import torch

    from glmtune.plan import estimate as est
    from glmtune.plan import speed

    if not step_times:
        return {}
    tok_s = spec["batch"] * spec["seq"] / (sum(step_times) / len(step_times))
    dtype = "bfloat16" if tuner.plan.bf16 else "float32"
    peak = speed.matmul_rate(2048, 2048, 2048, dtype)
    shape = est.shape_from_config(tuner.source.config)
    n = shape.linear_params + shape.vocab * shape.hidden
    return {"tok_s": round(tok_s, 3), "tok_s_per_core": round(tok_s / torch.get_num_threads(), 3),
            "peak_gflops": round(peak / 1e9, 1),
            "pct_of_4NT_bound": round(100 * 4 * n * tok_s / peak, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do (default: all)")
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", 3)))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        report(child(json.loads(args.child)))
        return 0
    results = {}
    for name in args.only or RUNS:
        model, quant, batch, seq, ckpt = RUNS[name]
        if model == "tiny-glm":
            path = model
        elif model == "chatglm3-6b-bin":
            path = str(build_chatglm3_bin(model))
        else:
            path = str(build_random_glm(model))
        spec = dict(model=path, quant=quant, batch=batch, seq=seq, ckpt=ckpt, steps=args.steps,
                    out=str(CACHE / "runs" / name))
        print(f"== {name}: {model} quant={quant} batch={batch} seq={seq} checkpointing={ckpt}",
              flush=True)
        results[name] = {"quant": quant, **run_child(__file__, json.dumps(spec))}
        print(f"   {results[name]}", flush=True)
    for label, (quantized, full) in QUANT_PAIRS.items():
        if results.get(quantized, {}).get("s_per_step") and results.get(full, {}).get("s_per_step"):
            ratio = results[quantized]["s_per_step"] / results[full]["s_per_step"]
            results[f"{label}-quant-over-none"] = round(ratio, 3)
            print(f"{label}: 4-bit step / unquantized step at the same tokens = {ratio:.2f}x")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
