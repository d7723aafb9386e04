"""Priorities across the mesh, one run: interactive time to first token while batch traffic saturates the workers,
against the same interactive requests on the idle mesh; batch throughput kept; and a two-tenant fairness figure.
The same real worker processes serve every phase. Prints JSON.

    python bench/priority.py [--workers 2] [--duration 20] [--batch-clients 20] [--interactive-every 0.5]
    python bench/priority.py --through-run    # idle vs mixed through `llmserve run`'s gateway (what users get)

Phases, in order:
  idle          the interactive requests alone (TTFT p50/p95: the reference)
  batch_alone   batch clients keep every slot busy (--batch-clients > the pool's slots, so a few always queue)
  mixed         batch clients and the interactive requests together, through a scheduler with preemption on
                (scheduler.preemption, the default): an interactive task takes a slot batch sequences hold
  mixed_no_preemption   the same through a scheduler with preemption off (the baseline: a priority queue only)
  fairness      tenant A queues --flood standard requests at once, tenant B sends one just after: B's wait
                against A's (fair turns per tenant inside a class; a FIFO would put B behind all of A's)

Interactive requests arrive open-loop, one every --interactive-every seconds, each a distinct prompt (no prefix
cache hits across requests or phases: every phase has its own cache salts). Requests go straight to the
schedulers' Submit with the prompt's token ids, as the gateway sends them; each scheduler runs in this process
with its own Serve streams to every worker (as bench/routing.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

import grpc
from prometheus_client import REGISTRY

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.routing import WorkerProcess, bench_config, percentile
from llmserve.clients.client import _params
from llmserve.common.config import MeshConfig
from llmserve.common.logs import configure_logging
from llmserve.common.meshauth import mesh_metadata
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from llmserve.scheduler.app import SchedulerApp
from tests.helpers.local_mesh import LocalMesh
from tests.helpers.mesh import generate_version, start_mesh
from tests.helpers.servers import etcd_server, redis_server, running
from tests.helpers.tiny_models import SMOLLM2_SOURCE, smollm2_tokenizer

VERSION = "smollm2-priority"
INTERACTIVE, STANDARD, BATCH = 1, 2, 3
TOPICS = ("rivers", "lanterns", "orbits", "copper", "meadows", "harbors", "quartz", "willows", "canyons", "beacons")


@dataclasses.dataclass
class Result:
    ttft_s: float | None = None
    queue_ms: float = 0.0
    dispatched_at: float = 0.0
    tokens: list[float] = dataclasses.field(default_factory=list)  # arrival time of each completion token


async def submit(stub, token: str, salt: str, prompt: list[int], max_tokens: int, priority: int,
                 sink: list[float] | None = None) -> Result:
    """One task; sink, when given, receives each completion token's arrival time as it comes (a batch request
    that is cut off at the end of a phase still counts the tokens it produced)."""
    task = task_pb2.Task(request_id=uuid.uuid4().hex, model_version=VERSION, cache_salt=salt, priority=priority,
                         generate=task_pb2.GenerateInput(prompt_token_ids=prompt, sampling=task_pb2.SamplingParams(
                             temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
    started = time.perf_counter()
    result = Result()
    call = stub.Submit(metadata=mesh_metadata(token))
    await call.write(scheduler_pb2.SubmitRequest(task=task))
    async for response in call:
        if response.HasField("dispatched"):
            result.queue_ms, result.dispatched_at = response.dispatched.queue_time_ms, time.perf_counter()
            continue
        out = response.output
        if out.HasField("error"):
            raise RuntimeError(f"task failed: {out.error.message}")
        if out.token_ids:
            now = time.perf_counter()
            if result.ttft_s is None:
                result.ttft_s = now - started
            (result.tokens if sink is None else sink).extend([now] * len(out.token_ids))
        if out.finished:
            break
    call.cancel()
    return result


def prompt_ids(tokenizer, kind: str, i: int, words: int) -> list[int]:
    text = f"{kind} request {i} ({uuid.uuid4().hex[:8]}): write about " + ", ".join(
        TOPICS[(i + k) % len(TOPICS)] for k in range(words))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def interactive_load(stub, token: str, tokenizer, phase: str, args) -> list[Result]:
    """Open loop: one interactive request every --interactive-every s for --duration s."""
    tasks = []
    for i in range(int(args.duration / args.interactive_every)):
        prompt = prompt_ids(tokenizer, "Interactive", i, 6)
        tasks.append(asyncio.create_task(submit(stub, token, f"web-{phase}", prompt, args.interactive_tokens,
                                                INTERACTIVE)))
        await asyncio.sleep(args.interactive_every)
    return list(await asyncio.gather(*tasks))


async def batch_load(stub, token: str, tokenizer, phase: str, args, stop: asyncio.Event) -> list[float]:
    """Closed loop: --batch-clients clients, each sending its next request when the last ends, until stop;
    returns every completion token's arrival time."""
    tokens: list[float] = []

    async def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            prompt = prompt_ids(tokenizer, f"Batch {c}", i, 14)
            await submit(stub, token, f"batch-{phase}", prompt, args.batch_tokens, BATCH, sink=tokens)
            i += 1

    clients = [asyncio.create_task(client(c)) for c in range(args.batch_clients)]
    await stop.wait()
    for c in clients:
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return tokens


def ttft_figures(results: list[Result]) -> dict:
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    return {"requests": len(ttfts), "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p95_ms": round(percentile(ttfts, 0.95) * 1000, 1),
            "queue_p95_ms": round(percentile([r.queue_ms for r in results], 0.95), 1)}


def tokens_per_s(tokens: list[float], start: float, end: float) -> float:
    return round(sum(start <= t < end for t in tokens) / (end - start), 1)


async def phase(stub, token, tokenizer, name: str, args, batch: bool, interactive: bool) -> dict:
    stop = asyncio.Event()
    loader = asyncio.create_task(batch_load(stub, token, tokenizer, name, args, stop)) if batch else None
    if batch:
        await asyncio.sleep(args.warmup)  # every slot busy before anything is measured
    start = time.perf_counter()
    figures: dict = {}
    if interactive:
        figures["interactive"] = ttft_figures(await interactive_load(stub, token, tokenizer, name, args))
    else:
        await asyncio.sleep(args.duration)
    end = time.perf_counter()
    if loader is not None:
        stop.set()
        figures["batch_tokens_per_s"] = tokens_per_s(await loader, start, end)
    return figures


async def fairness(stub, token, tokenizer, args) -> dict:
    flood = [asyncio.create_task(submit(stub, token, "tenant-a", prompt_ids(tokenizer, "Tenant A", i, 6),
                                        args.fairness_tokens, STANDARD)) for i in range(args.flood)]
    await asyncio.sleep(0.3)  # A's requests are all queued (or running) before B's arrives
    single = await submit(stub, token, "tenant-b", prompt_ids(tokenizer, "Tenant B", 0, 6), args.fairness_tokens,
                          STANDARD)
    a = await asyncio.gather(*flood)
    return {"tenant_a_requests": len(a), "tenant_b_queue_ms": round(single.queue_ms, 1),
            "tenant_b_ttft_ms": round((single.ttft_s or 0) * 1000, 1),
            "tenant_a_queue_p50_ms": round(statistics.median(r.queue_ms for r in a), 1),
            "tenant_a_queue_max_ms": round(max(r.queue_ms for r in a), 1),
            "tenant_a_dispatched_before_b": sum(r.dispatched_at < single.dispatched_at for r in a)}


async def main(args) -> dict:
    configure_logging("warning")
    tokenizer = smollm2_tokenizer()
    with running(etcd_server()) as etcd, running(redis_server()) as redis, tempfile.TemporaryDirectory() as tmp:
        config = bench_config(etcd, redis, tmp, "priority")
        mesh = await start_mesh(config, versions=[generate_version(VERSION, SMOLLM2_SOURCE, context_length=2048,
                                                                   family="smollm2")], aliases={}, worker_models=[])
        directory = pathlib.Path(tmp)
        workers = [WorkerProcess(config, directory, f"w{i + 1}", [VERSION], args.kv_blocks, args.threads)
                   for i in range(args.workers)]
        schedulers = {}
        try:
            for preemption in (True, False):
                cfg = MeshConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
                cfg.scheduler = dataclasses.replace(config.scheduler, routing="least_loaded", preemption=preemption)
                app = SchedulerApp(cfg)
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{await app.start()}")
                schedulers[preemption] = (app, channel, scheduler_pb2_grpc.SchedulerServiceStub(channel))
            for app, _, _ in schedulers.values():
                while not all(app.dispatcher.workers.get(w.worker_id) and app.dispatcher.workers[w.worker_id].is_ready
                              for w in workers):
                    await asyncio.sleep(0.2)
            token = config.security.mesh_token
            on, off = schedulers[True][2], schedulers[False][2]
            # One short warm-up per worker (first-step allocations), not measured.
            await asyncio.gather(*(submit(on, token, "warmup", prompt_ids(tokenizer, "Warm", i, 6), 4, STANDARD)
                                   for i in range(2 * args.workers)))
            results = {
                "idle": await phase(on, token, tokenizer, "idle", args, batch=False, interactive=True),
                "batch_alone": await phase(on, token, tokenizer, "alone", args, batch=True, interactive=False),
                "mixed": await phase(on, token, tokenizer, "mixed", args, batch=True, interactive=True),
                "mixed_no_preemption": await phase(off, token, tokenizer, "mixed-off", args, batch=True,
                                                   interactive=True),
                "fairness": await fairness(on, token, tokenizer, args),
            }
            preemptions = REGISTRY.get_sample_value("llmserve_scheduler_preempting_dispatches_total",
                                                    {"model_version": VERSION, "priority": "PRIORITY_INTERACTIVE"})
        finally:
            for app, channel, _ in schedulers.values():
                await channel.close()
                await app.stop(0)
            for w in workers:
                w.stop()
            await mesh.stop()
    idle, mixed, off_figures = results["idle"]["interactive"], results["mixed"]["interactive"], \
        results["mixed_no_preemption"]["interactive"]
    alone = results["batch_alone"]["batch_tokens_per_s"]
    kept = round(results["mixed"]["batch_tokens_per_s"] / alone, 3) if alone else None
    return {
        "benchmark": "priority",
        "workload": {"workers": args.workers, "slots_per_worker": 8, "threads_per_worker": args.threads,
                     "batch_clients": args.batch_clients, "batch_max_tokens": args.batch_tokens,
                     "interactive_every_s": args.interactive_every, "interactive_max_tokens": args.interactive_tokens,
                     "duration_s": args.duration, "model": "SmolLM2-135M fp32",
                     "path": "scheduler Submit (in-process schedulers, real worker processes)"},
        "results": results,
        "preempting_dispatches": preemptions,
        "interactive_p95_over_idle": round(mixed["ttft_p95_ms"] / idle["ttft_p95_ms"], 2),
        "interactive_p95_over_idle_without_preemption": round(off_figures["ttft_p95_ms"] / idle["ttft_p95_ms"], 2),
        "batch_throughput_kept": kept,
        "targets": {"interactive_p95_at_most_2x_idle": mixed["ttft_p95_ms"] <= 2 * idle["ttft_p95_ms"],
                    "batch_throughput_at_least_80pct": kept is not None and kept >= 0.8},
    }


async def gateway_stream(stub, auth, prompt: str, max_tokens: int, priority: str) -> float | None:
    """One streamed completion through the gateway; its time to the first text."""
    started, ttft = time.perf_counter(), None
    call = stub.StreamCompletion(pb.StreamCompletionRequest(model="smollm2", prompt=prompt, **_params(
        max_tokens=max_tokens, temperature=0.0, skip_cache=True, ignore_eos=True, priority=priority)),
        metadata=auth, timeout=300)
    async for chunk in call:
        if ttft is None and any(c.text for c in chunk.choices):
            ttft = time.perf_counter() - started
    return ttft


async def through_run(args) -> dict:
    """Idle against mixed interactive TTFT through `llmserve run` as a user starts it (every service its own
    process, requests through the gateway with an API key), --workers workers of 8 slots and --threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        mesh = LocalMesh(tmp, workers=args.workers, worker={"max_num_seqs": 8, "num_threads": args.threads,
                                                             "dtype": "float32"}).start()
        try:
            channel = grpc.aio.insecure_channel(mesh.gateway)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            auth = (("authorization", f"Bearer {mesh.api_key}"),)
            await asyncio.gather(*(gateway_stream(stub, auth, f"Warm {i}", 4, "standard") for i in range(4)))

            async def interactive(tag: str) -> list[float]:
                tasks = []
                for i in range(int(args.duration / args.interactive_every)):
                    prompt = f"Interactive {tag} request {i} ({uuid.uuid4().hex[:8]}): write about rivers and lanterns"
                    tasks.append(asyncio.create_task(gateway_stream(stub, auth, prompt, args.interactive_tokens,
                                                                    "interactive")))
                    await asyncio.sleep(args.interactive_every)
                return [t for t in await asyncio.gather(*tasks) if t is not None]

            idle = await interactive("idle")
            stop = asyncio.Event()

            async def batch(c: int) -> None:
                i = 0
                while not stop.is_set():
                    await gateway_stream(stub, auth, f"Batch {c} request {i} ({uuid.uuid4().hex[:8]}): write about "
                                         "rivers, lanterns, orbits, copper, meadows, harbors and quartz",
                                         args.batch_tokens, "batch")
                    i += 1
            clients = [asyncio.create_task(batch(c)) for c in range(args.batch_clients)]
            await asyncio.sleep(args.warmup)
            mixed = await interactive("mixed")
            stop.set()
            for c in clients:
                c.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await channel.close()
        finally:
            mesh.stop()
    figures = {name: {"ttft_p50_ms": round(statistics.median(v) * 1000, 1),
                      "ttft_p95_ms": round(percentile(v, 0.95) * 1000, 1), "requests": len(v)}
               for name, v in (("idle", idle), ("mixed", mixed))}
    return {"benchmark": "priority, through llmserve run", "results": figures,
            "interactive_p95_over_idle": round(figures["mixed"]["ttft_p95_ms"] / figures["idle"]["ttft_p95_ms"], 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of batch load before measuring")
    parser.add_argument("--batch-clients", type=int, default=20, help="closed-loop batch clients (pool: 16 slots)")
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--interactive-every", type=float, default=0.5)
    parser.add_argument("--interactive-tokens", type=int, default=8)
    parser.add_argument("--flood", type=int, default=100, help="tenant A's requests in the fairness phase")
    parser.add_argument("--fairness-tokens", type=int, default=8)
    parser.add_argument("--kv-blocks", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--through-run", action="store_true",
                        help="idle vs mixed only, through the gateway of `llmserve run` (separate processes)")
    parsed = parser.parse_args()
    print(json.dumps(asyncio.run(through_run(parsed) if parsed.through_run else main(parsed)), indent=2))
