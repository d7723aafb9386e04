"""What each stored form of SmolLM2-135M costs and buys, all in one run; prints JSON.

    .venv/bin/python bench/quantization.py [--quick] [--rounds N] [--out FILE]

Variants, as registry versions can ask for them (ModelVersion.quantization, worker.dtype):
  fp32   float32 weights and activations (what `dtype: auto` loads on a CPU without AMX)
  bf16   bfloat16 weights (oneDNN-reordered copies), fp32 residual stream (what `auto` loads with AMX or CUDA)
  int8   int8 weight-only, one scale per output channel, bf16 activations (smollm2-135m-instruct-int8); the bf16
         weights stay for steps of 8 rows or more, where aten's int8 kernel is slower than bf16's
Rows per variant, through PagedEngine on the compute thread as a worker runs it (torch.set_num_threads(2)):
  decode_b1_tokens_per_s   one request, 32-token prompt, 128 tokens out: decode tokens/s after the first token
  decode_b32_tokens_per_s  32 requests at once, 32-token prompts, 64 tokens out each: generated tokens/s
  prefill_tokens_per_s     one 1,024-token prompt: prompt tokens / time to first token
  weight_mb                bytes of every distinct weight tensor the engine holds (model, copies, int8 + scales)
  perplexity               exp(mean NLL) of a fixed English text (the `pydoc_data` reference topics of this
                           Python, the first ~4,096 tokens in 1,024-token windows), by the engine's own LM head;
                           int8 is scored with its int8 weights at every row count (as decode reads them), not
                           the bf16 copies its prefill steps use
Speeds alternate the variants round by round (--rounds, median kept), so machine drift hits all alike. The
baseline row is Hugging Face's fp32 model on the same windows (perplexity only: it checks our fp32 path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine import SOURCE, Run, make_engine, on_compute, random_prompts  # noqa: E402

from llmserve.worker.models import load_generation_model  # noqa: E402

VARIANTS = {"fp32": ("float32", ""), "bf16": ("bfloat16", ""), "int8": ("bfloat16", "int8")}
WINDOW = 1024


def fixed_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def weight_bytes(engine) -> int:
    """Distinct storages of the model's parameters and of the runner's kernel-specific weight copies."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except NotImplementedError:  # oneDNN's reordered weights are opaque: their own bytes
            seen[id(t)] = t.numel() * t.element_size()

    for p in engine.runner.model.parameters():
        add(p)
    matmul = engine.runner.matmul
    for t in matmul._onednn_weight.values():
        add(t)
    for q, scales in matmul._int8_weight.values():
        add(q)
        add(scales)
    return sum(seen.values())


def perplexity_of(score, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logprobs = score(ids)
        nll -= float(logprobs.sum())
        count += len(ids) - 1
    return round(math.exp(nll / count), 3)


def hf_score(model):
    def score(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return score


async def decode_b1(engine, prompt: list[int], num_out: int) -> float:
    (r,), _ = await Run(engine).many([("b1", prompt, num_out)])
    return (r["tokens"] - 1) / (r["latency"] - r["ttft"])


async def decode_b32(engine, prompts: list[list[int]], num_out: int) -> float:
    results, elapsed = await Run(engine).many([(f"b{i}", p, num_out) for i, p in enumerate(prompts)])
    return sum(r["tokens"] for r in results) / elapsed


async def prefill(engine, prompt: list[int]) -> float:
    (r,), _ = await Run(engine).many([("p", prompt, 1)])
    return len(prompt) / r["ttft"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    num_windows = 1 if args.quick else 4
    b1_out, b32_n, b32_out = (32, 8, 16) if args.quick else (128, 32, 64)
    torch.manual_seed(0)
    cache = REPO / ".llmserve" / "models"

    engines, models = {}, {}
    for name, (dtype, quantization) in VARIANTS.items():
        model, tokenizer = on_compute(load_generation_model, SOURCE, cache, "cpu", dtype)
        models[name] = model
        engines[name] = make_engine(model, tokenizer, quantization=quantization, num_kv_blocks=1024,
                                    enable_prefix_caching=False)
    tokens = tokenizer(fixed_text(), add_special_tokens=False)["input_ids"]
    windows = [tokens[i * WINDOW:(i + 1) * WINDOW] for i in range(num_windows)]


    rng = random.Random(0)
    vocab = models["fp32"].config.vocab_size
    b1_prompt = random_prompts(rng, [32], vocab)[0]
    b32_prompts = random_prompts(rng, [32] * b32_n, vocab)
    long_prompt = random_prompts(rng, [WINDOW], vocab)[0]

    speeds: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b32": [], "prefill": []} for n in VARIANTS}

    async def measure() -> None:
        for engine in engines.values():  # warm-up: first steps pay allocator and kernel set-up
            await decode_b1(engine, b1_prompt, 8)
        for _ in range(rounds):
            for name, engine in engines.items():
                speeds[name]["b1"].append(await decode_b1(engine, b1_prompt, b1_out))
                speeds[name]["b32"].append(await decode_b32(engine, b32_prompts, b32_out))
                speeds[name]["prefill"].append(await prefill(engine, long_prompt))
        for engine in engines.values():
            await engine.stop()

    asyncio.run(measure())
    block_table = list(range(-(-WINDOW // engines["fp32"].block_manager.block_size)))
    rows = {}
    for name, engine in engines.items():
        matmul = engine.runner.matmul
        chosen = list(matmul.choice)
        if "int8" in matmul.kernels:  # score with the int8 weights at every row count, as decode reads them
            matmul.choice = ["int8"] * len(chosen)
        ppl = on_compute(perplexity_of, lambda ids, e=engine: e.runner.prompt_logprobs(ids, block_table), windows)
        matmul.choice = chosen
        rows[name] = {
            "decode_b1_tokens_per_s": round(statistics.median(speeds[name]["b1"]), 1),
            "decode_b32_tokens_per_s": round(statistics.median(speeds[name]["b32"]), 1),
            "prefill_tokens_per_s": round(statistics.median(speeds[name]["prefill"]), 1),
            "weight_mb": round(weight_bytes(engine) / 2**20, 1),
            "perplexity": ppl,
            "kernel_by_row_bucket": dict(zip(("1", "2-7", "8-31", "32-127", "128+"), engine.runner.matmul.choice,
                                             strict=True)),
        }
    base = rows["fp32"]
    for row in rows.values():
        row["vs_fp32"] = {
            "decode_b1": round(row["decode_b1_tokens_per_s"] / base["decode_b1_tokens_per_s"], 2),
            "decode_b32": round(row["decode_b32_tokens_per_s"] / base["decode_b32_tokens_per_s"], 2),
            "prefill": round(row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 2),
            "weight_memory": round(row["weight_mb"] / base["weight_mb"], 2),
            "perplexity": round(row["perplexity"] / base["perplexity"], 4),
        }
    started = time.perf_counter()
    hf_ppl = on_compute(perplexity_of, hf_score(models["fp32"]), windows)
    report = {
        "bench": "quantization", "model": SOURCE, "threads": torch.get_num_threads(), "rounds": rounds,
        "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "perplexity_text": {"source": "pydoc_data.topics (sorted topics)", "tokens": sum(len(w) for w in windows),
                            "window": WINDOW},
        "variants": rows,
        "baseline_hf_fp32": {"perplexity": hf_ppl, "seconds": round(time.perf_counter() - started, 1)},
        "targets": {"int8_decode_b1_vs_fp32_at_least": 2.0, "int8_perplexity_vs_fp32_at_most": 1.05,
                    "int8_decode_b1_vs_fp32": rows["int8"]["vs_fp32"]["decode_b1"],
                    "int8_perplexity_vs_fp32": rows["int8"]["vs_fp32"]["perplexity"]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
