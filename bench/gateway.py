"""Gateway cost per request on the response-cache-hit path, against a plain grpcio echo server as the floor.

Both servers are separate processes; this process is the load generator (grpc.aio). Prints JSON:
  latency at concurrency 1 (p50, p99) and throughput at --concurrency, for
  - echo: a grpcio aio server answering CreateCompletion with a fixed response (no work at all);
  - gateway_cache_hit: auth + validation + alias routing + Redis cache lookup + usage counting, no limits;
  - gateway_cache_hit_limited: the same for a tenant with rate limits (one more Redis script per request).
  overhead = gateway - echo, the gateway's own cost per request.

    python bench/gateway.py [--requests 1000] [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import wrappers_pb2 as w

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.clients.admin import tenant_stub
from llmserve.common.net import free_port
from llmserve.common.server import SERVER_OPTIONS
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.local_mesh import LocalMesh

REQUEST = pb.CreateCompletionRequest(model="smollm2", prompt="What is the capital of France?",
                                     max_tokens=w.Int32Value(value=8), temperature=w.FloatValue(value=0.0))


class Echo(inference_pb2_grpc.InferenceServiceServicer):
    RESPONSE = pb.CreateCompletionResponse(
        id="cmpl-0", object="text_completion", created=1, model="smollm2-135m-instruct-v1",
        choices=[pb.CompletionChoice(index=0, text=" The capital of France is Paris.", finish_reason="stop")],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=8, total_tokens=15))

    async def CreateCompletion(self, request, context):
        return self.RESPONSE


async def serve_echo(port: int) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
            "n": len(ordered)}


async def latency(stub, metadata, requests: int) -> dict:
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await stub.CreateCompletion(REQUEST, metadata=metadata)
        samples.append(time.perf_counter() - started)
    return summary(samples)


async def throughput(stub, metadata, seconds: float, concurrency: int) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop():
        nonlocal done
        while time.perf_counter() < deadline:
            await stub.CreateCompletion(REQUEST, metadata=metadata)
            done += 1
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return round(done / (time.perf_counter() - started), 1)


async def measure(args, mesh: LocalMesh, echo_port: int) -> dict:
    with grpc.insecure_channel(mesh.address("registry")) as channel:
        admin = tenant_stub(channel, (mesh.state / "admin-key").read_text().strip())
        admin.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(
            name="bench-limited", requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000)))
        limited_key = admin.CreateApiKey(tpb.CreateApiKeyRequest(tenant="bench-limited")).key
    targets = {
        "echo": (f"127.0.0.1:{echo_port}", ()),
        "gateway_cache_hit": (mesh.gateway, (("authorization", f"Bearer {mesh.api_key}"),)),
        "gateway_cache_hit_limited": (mesh.gateway, (("authorization", f"Bearer {limited_key}"),)),
    }
    results = {}
    for name, (address, metadata) in targets.items():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(3):  # the first call generates and fills the cache; the rest are hits
                await stub.CreateCompletion(REQUEST, metadata=metadata, timeout=120)
            call = stub.CreateCompletion(REQUEST, metadata=metadata)
            await call
            cache = dict(await call.initial_metadata()).get("x-llmserve-cache", "n/a")
            results[name] = {"cache": cache, "latency_c1": await latency(stub, metadata, args.requests),
                             f"requests_per_s_c{args.concurrency}": await throughput(
                                 stub, metadata, args.seconds, args.concurrency)}
    echo = results["echo"]["latency_c1"]
    for name in ("gateway_cache_hit", "gateway_cache_hit_limited"):
        lat = results[name]["latency_c1"]
        results[name]["overhead_vs_echo_ms"] = {"p50": round(lat["p50_ms"] - echo["p50_ms"], 3),
                                                "p99": round(lat["p99_ms"] - echo["p99_ms"], 3)}
    hit = results["gateway_cache_hit"]
    return {
        "setup": {"requests_c1": args.requests, "seconds": args.seconds, "concurrency": args.concurrency,
                  "note": "servers and this load generator share the machine's cores"},
        **results,
        "targets": {
            "cache_hit_p50_under_2ms": hit["latency_c1"]["p50_ms"] < 2.0,
            "cache_hit_3000_rps": hit[f"requests_per_s_c{args.concurrency}"] >= 3000,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(serve_echo(args.echo_server))
        return
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_port)])
    try:
        with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp, LocalMesh(tmp) as mesh:
            result = asyncio.run(measure(args, mesh, echo_port))
    finally:
        echo.terminate()
        echo.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
