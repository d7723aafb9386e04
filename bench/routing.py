"""KV-aware routing against round-robin and least-loaded, one run: a multi-tenant workload with shared long
prefixes (P system prompts of L tokens, U users each) over N real worker processes, and one single worker with the
pool's whole KV capacity as the hit-rate reference. Prints JSON.

    python bench/routing.py [--workers 2] [--prefixes 8] [--prefix-tokens 1000] [--users 6] [--concurrency 4]

All three routings run against the same worker processes, each through its own scheduler (in this process, each
with its own Serve streams to every worker) and with its own cache salt, so none reuses another's cached blocks.
Each worker's KV cache holds about --kv-share of the prefixes (the regime where routing matters: KV memory, not
compute, bounds what a worker keeps); the single worker holds N times that. Requests go straight to the schedulers'
Submit (with the prompt's token ids, as the gateway sends them once it has counted them).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import pathlib
import random
import statistics
import sys
import tempfile
import time
import uuid

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmserve.common.config import MeshConfig
from llmserve.common.logs import configure_logging
from llmserve.common.meshauth import mesh_metadata
from llmserve.common.net import free_port
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2
from llmserve.scheduler.app import SchedulerApp
from tests.helpers.mesh import generate_version, start_mesh
from tests.helpers.processes import ServiceProcess
from tests.helpers.servers import etcd_server, redis_server, running
from tests.helpers.tiny_models import SMOLLM2_SOURCE, model_cache_dir, smollm2_tokenizer

POOL, SINGLE = "smollm2-pool", "smollm2-single"
ROUTINGS = ("kv", "round_robin", "least_loaded")
WORDS = ("river stone lantern orbit velvet copper meadow signal harbor ember quartz willow cipher tundra falcon "
         "marble prism canyon atlas beacon").split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def workload(tokenizer, args) -> list[tuple[int, list[int]]]:
    """(prefix index, prompt token ids): P system prompts of ~L tokens, U distinct user turns each, shuffled."""
    rng = random.Random(7)
    prefixes = []
    for p in range(args.prefixes):
        words = [f"Tenant {p} system prompt."] + [rng.choice(WORDS) for _ in range(args.prefix_tokens * 2)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:args.prefix_tokens]
        prefixes.append(ids)
    requests = []
    for p, prefix in enumerate(prefixes):
        for u in range(args.users):
            turn = tokenizer(f"\nUser {u}: tell me about {rng.choice(WORDS)} and {rng.choice(WORDS)}, briefly.",
                             add_special_tokens=False)["input_ids"]
            requests.append((p, prefix + turn))
    rng.shuffle(requests)
    return requests


class WorkerProcess(ServiceProcess):
    def __init__(self, config: MeshConfig, directory: pathlib.Path, name: str, models: list[str], kv_blocks: int,
                 threads: int):
        self.port = free_port()
        self.worker_id = f"bench-{name}"
        super().__init__(config, directory, "worker", name, port=self.port, metrics_port=0, worker_id=self.worker_id,
                         models=models, num_kv_blocks=kv_blocks, num_threads=threads, max_num_seqs=8)

    def stop(self, graceful: bool = True) -> None:
        super().stop(graceful)


def bench_config(etcd, redis, journal_dir: str, name: str) -> MeshConfig:
    """The mesh's config for a bench on the test servers: services on free ports without metrics, SmolLM2 in
    float32 from the model cache, a mesh token, warnings only."""
    config = MeshConfig()
    config.etcd.port, config.etcd.prefix = etcd.port, f"/bench-{name}"
    config.redis.url = f"redis://127.0.0.1:{redis.port}/0"
    config.gateway.journal_dir = journal_dir
    for section in (config.gateway, config.scheduler, config.worker, config.registry):
        section.port, section.metrics_port = 0, 0
    config.worker.model_cache_dir = str(model_cache_dir())
    config.worker.dtype = "float32"
    config.security.mesh_token = f"bench-{name}"
    config.scheduler.worker_wait_s = 0
    config.log.level = "warning"
    return config


async def run_one(stub, token, version: str, salt: str, prompt: list[int], max_tokens: int) -> dict:
    task = task_pb2.Task(request_id=uuid.uuid4().hex, model_version=version, cache_salt=salt,
                         generate=task_pb2.GenerateInput(prompt_token_ids=prompt, sampling=task_pb2.SamplingParams(
                             temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
    started = time.perf_counter()
    call = stub.Submit(metadata=mesh_metadata(token))
    await call.write(scheduler_pb2.SubmitRequest(task=task))
    ttft, worker, last = None, "", None
    async for response in call:
        if response.HasField("dispatched"):
            worker = response.dispatched.worker_id
            continue
        out = response.output
        if out.HasField("error"):
            raise RuntimeError(f"task failed: {out.error.message}")
        if ttft is None and (out.token_ids or out.text_delta):
            ttft = time.perf_counter() - started
        last = out
        if out.finished:
            break
    call.cancel()
    return {"ttft_s": ttft, "prompt": last.prompt_tokens, "cached": last.cached_tokens, "worker": worker}


async def run_mode(address: str, token: str, version: str, salt: str, requests, args) -> dict:
    channel = grpc.aio.insecure_channel(address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    results: list[dict] = []

    async def client() -> None:
        while not queue.empty():
            _, prompt = queue.get_nowait()
            results.append(await run_one(stub, token, version, salt, prompt, args.max_tokens))
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    await channel.close()
    ttfts = [r["ttft_s"] for r in results]
    per_worker: dict[str, int] = {}
    for r in results:
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
    return {"prefix_cache_hit_rate": round(sum(r["cached"] for r in results) / sum(r["prompt"] for r in results), 4),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p90_ms": round(percentile(ttfts, 0.9) * 1000, 1),
            "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000, 1),
            "wall_s": round(elapsed, 1), "requests_per_worker": dict(sorted(per_worker.items()))}


async def main(args) -> dict:
    configure_logging("warning")  # the in-process services' logs go to stderr; stdout is the JSON
    tokenizer = smollm2_tokenizer()
    requests = workload(tokenizer, args)
    block = 16
    per_prefix_blocks = math.ceil(args.prefix_tokens / block)
    headroom = args.concurrency * 4 + 8  # running sequences' own blocks (user turn + output)
    kv_blocks = math.ceil(args.kv_share * args.prefixes * per_prefix_blocks) + headroom
    with running(etcd_server()) as etcd, running(redis_server()) as redis, \
            tempfile.TemporaryDirectory() as tmp:
        config = bench_config(etcd, redis, tmp, "routing")
        versions = [generate_version(v, SMOLLM2_SOURCE, context_length=4096, family="smollm2")
                    for v in (POOL, SINGLE)]
        mesh = await start_mesh(config, versions=versions, aliases={}, worker_models=[])
        directory = pathlib.Path(tmp)
        workers = [WorkerProcess(config, directory, f"w{i + 1}", [POOL], kv_blocks, args.threads)
                   for i in range(args.workers)]
        workers.append(WorkerProcess(config, directory, "single", [SINGLE], kv_blocks * args.workers, args.threads))
        schedulers = {}
        try:
            for routing in ROUTINGS:
                cfg = MeshConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
                cfg.scheduler = dataclasses.replace(config.scheduler, routing=routing,
                                                    kv_load_weight=args.kv_load_weight)
                app = SchedulerApp(cfg)
                schedulers[routing] = (app, f"127.0.0.1:{await app.start()}")
            await mesh.scheduler.view.workers.wait_for(lambda s: all(w.worker_id in s for w in workers), 600)
            for app, _ in schedulers.values():
                while not all(app.dispatcher.workers.get(w.worker_id) and app.dispatcher.workers[w.worker_id].is_ready
                              for w in workers):
                    await asyncio.sleep(0.2)
            token = config.security.mesh_token
            results = {}
            for routing in ROUTINGS:
                address = schedulers[routing][1]
                results[routing] = await run_mode(address, token, POOL, f"bench-{routing}", requests, args)
            results["single_worker"] = await run_mode(schedulers["kv"][1], token, SINGLE, "bench-single", requests,
                                                      args)
        finally:
            for app, _ in schedulers.values():
                await app.stop(0)
            for w in workers:
                w.stop()
            await mesh.stop()
    kv, rr, single = results["kv"], results["round_robin"], results["single_worker"]
    return {
        "benchmark": "routing",
        "workload": {"prefixes": args.prefixes, "prefix_tokens": args.prefix_tokens, "users_per_prefix": args.users,
                     "requests": len(requests), "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "workers": args.workers, "kv_blocks_per_worker": kv_blocks, "block_size": block,
                     "kv_share_of_prefixes_per_worker": args.kv_share, "threads_per_worker": args.threads,
                     "kv_load_weight": args.kv_load_weight,
                     "order": list(ROUTINGS) + ["single_worker"]},
        "results": results,
        "kv_hit_rate_vs_single_worker": round(kv["prefix_cache_hit_rate"] / single["prefix_cache_hit_rate"], 3),
        "round_robin_ttft_p90_over_kv": round(rr["ttft_p90_ms"] / kv["ttft_p90_ms"], 2),
        "targets": {"hit_rate_within_10pct_of_single": kv["prefix_cache_hit_rate"] >= 0.9 * single[
            "prefix_cache_hit_rate"], "ttft_p90_at_least_2x_lower_than_round_robin": rr["ttft_p90_ms"] >= 2 * kv[
            "ttft_p90_ms"]},
        "routing_formula": "score = kv_hit_weight*hit - kv_load_weight*load - kv_pressure_weight*pressure "
                           "(defaults 1.0, 1.5, 0.5; see SchedulerConfig)",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-share", type=float, default=0.6,
                        help="share of the P prefixes one worker's KV cache holds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--kv-load-weight", type=float, default=1.5, help="scheduler.kv_load_weight of the kv run")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
