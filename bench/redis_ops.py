"""What one Redis shard can take of the gateway's operations: a real redis-server (one core, Redis is single
threaded), driven by pipelined clients; the figure is Redis's own CPU time per operation (INFO used_cpu_*), so
that a loaded machine does not understate it: ops/s per shard = 1e6 / cpu_us_per_op.

  cache_get:   GET of a response-cache entry (~300 bytes), the cache Redis's work for a hit
  cache_set:   SET with expiry of one, its work for a miss
  admit:       the ADMIT script with a key's and a tenant's request windows (a limited tenant's cache hit)
  admit_full:  ADMIT with four windows and an in-flight cap (a miss of a tenant with every limit)
  reconcile:   the RECONCILE script settling that reservation
  usage_flush: one usage flush (RECORD, six counters), which the gateway sends once per batch of requests

    python bench/redis_ops.py [--ops 20000] [--pipeline 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import redis.asyncio as aioredis

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmserve.common import usage
from llmserve.common.net import free_port
from llmserve.gateway.limits import ADMIT, RECONCILE, WINDOW_MS


async def redis_cpu_s(client) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(client, name: str, make, ops: int, depth: int) -> dict:
    """make(pipe, i) queues operation i on a pipeline; `depth` operations per round trip."""
    started, cpu = time.perf_counter(), await redis_cpu_s(client)
    for base in range(0, ops, depth):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(base, min(ops, base + depth)):
                make(pipe, i)
            await pipe.execute()
    cpu = await redis_cpu_s(client) - cpu
    wall = time.perf_counter() - started
    result = {"ops": ops, "cpu_us_per_op": round(1e6 * cpu / ops, 2),
              "ops_per_s_per_shard": round(ops / cpu) if cpu else None, "wall_ops_per_s": round(ops / wall)}
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    return result


async def measure(port: int, ops: int, depth: int) -> dict:
    client = aioredis.Redis(port=port)
    value = json.dumps({"prompt_tokens": 7, "completion_tokens": 8,
                        "choices": [[" The capital of France is Paris." * 6, "stop"]]})
    await client.set("llmserve:cache:v1:hit", value)
    admit_sha = await client.script_load(ADMIT)
    reconcile_sha = await client.script_load(RECONCILE)
    record_sha = await client.script_load(usage.RECORD)
    tenant = "{bench}"
    results = {}
    results["cache_get"] = await run(client, "cache_get", lambda p, i: p.get("llmserve:cache:v1:hit"), ops, depth)
    results["cache_set"] = await run(client, "cache_set",
                                     lambda p, i: p.set(f"llmserve:cache:v1:{i}", value, ex=3600), ops, depth)

    def admit(windows: int, inflight: bool):
        def make(p, i):
            keys, args = [], [WINDOW_MS, f"r{i}", 60_000, 15_000]
            for w in range(windows):
                keys += [f"llmserve:rl:{tenant}:w{w}", f"llmserve:rl:{tenant}:w{w}:sum"]
                args += ["w", 10**12, 1 if w % 2 == 0 else 100, 0]
            if inflight:
                keys += [f"llmserve:rl:{tenant}:inflight", f"llmserve:rl:{tenant}:inflight:sum"]
                args += ["i", 10**9, 1, 0]
            p.evalsha(admit_sha, len(keys), *keys, *args)
        return make
    results["admit"] = await run(client, "admit", admit(2, False), ops, depth)
    results["admit_full"] = await run(client, "admit_full", admit(4, True), ops, depth)

    def reconcile(p, i):
        keys = [f"llmserve:rl:{tenant}:settled:r{i}"]
        args: list = [f"r{i}", 86400]
        for w in range(4):
            keys += [f"llmserve:rl:{tenant}:w{w}", f"llmserve:rl:{tenant}:w{w}:sum"]
            args += ["w", 1 if w % 2 == 0 else 100, 1 if w % 2 == 0 else 60]
        keys += [f"llmserve:rl:{tenant}:inflight", f"llmserve:rl:{tenant}:inflight:sum"]
        args += ["i", 1, 1]
        p.evalsha(reconcile_sha, len(keys), *keys, *args)
    results["reconcile"] = await run(client, "reconcile", reconcile, ops, depth)

    def flush(p, i):
        key = "llmserve:usage:bench:2026-12-03"
        fields = []
        for counter in usage.COUNTERS:
            fields += [f"key_1|smollm2-135m-instruct-v1|{counter}", 1]
        p.evalsha(record_sha, 2, key, f"{{{key}}}:flush:{uuid.uuid4().hex}", usage.FLUSH_MARKER_TTL_S,
                  usage.USAGE_TTL_S, *fields)
    results["usage_flush"] = await run(client, "usage_flush", flush, ops, depth)
    version = (await client.info("server"))["redis_version"]
    await client.aclose()
    return {"redis": version, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--pipeline", type=int, default=64, help="operations per round trip")
    args = parser.parse_args()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llmserve-redis-bench-") as tmp:
        server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            result = asyncio.run(measure(port, args.ops, args.pipeline))
        finally:
            server.terminate()
            server.wait()
    print(json.dumps({**result, "pipeline": args.pipeline,
                      "note": "Redis's CPU time per operation: ops_per_s_per_shard is what one Redis core "
                              "sustains; wall_ops_per_s is bounded by this Python client on a shared machine"},
                     indent=2))


if __name__ == "__main__":
    main()
