"""The mesh's overhead: the same requests through the gateway (gateway -> scheduler -> worker, separate processes,
as `make run` starts them) and straight to the worker's Serve stream, interleaved, in one run. Prints JSON.

    python bench/mesh.py [--requests 20] [--max-tokens 16] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

import grpc
from google.protobuf import wrappers_pb2 as w

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmserve.dispatch.v1 import task_pb2, worker_pb2, worker_pb2_grpc
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.local_mesh import LocalMesh

VERSION = "smollm2-135m-instruct-v1"


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2), "p95_ms": round(pick(0.95) * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2), "n": len(ordered)}


class Gateway:
    def __init__(self, address: str, key: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)

    async def run(self, prompt: str, max_tokens: int) -> tuple[float, float]:
        started = time.perf_counter()
        ttft = None
        request = pb.StreamCompletionRequest(model=VERSION, prompt=prompt, max_tokens=w.Int32Value(value=max_tokens),
                                             temperature=w.FloatValue(value=0.0), ignore_eos=True, skip_cache=True)
        async for chunk in self.stub.StreamCompletion(request, metadata=self.metadata):
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - started
        return ttft, time.perf_counter() - started

    async def cached(self, prompt: str) -> float:
        request = pb.CreateCompletionRequest(model=VERSION, prompt=prompt, max_tokens=w.Int32Value(value=4),
                                             temperature=w.FloatValue(value=0.0))
        started = time.perf_counter()
        await self.stub.CreateCompletion(request, metadata=self.metadata)
        return time.perf_counter() - started


class Worker:
    """One persistent Serve stream, multiplexed by request id, exactly as the scheduler uses it."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.waiting: dict[str, asyncio.Queue] = {}
        self.call = worker_pb2_grpc.WorkerServiceStub(self.channel).Serve(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            yield await self.outbox.get()

    async def _read(self):
        async for message in self.call:
            if message.HasField("output") and message.output.request_id in self.waiting:
                self.waiting[message.output.request_id].put_nowait(message.output)

    async def run(self, prompt: str, max_tokens: int) -> tuple[float, float]:
        request_id = uuid.uuid4().hex
        queue = self.waiting[request_id] = asyncio.Queue()
        started = time.perf_counter()
        self.outbox.put_nowait(worker_pb2.ServeRequest(task=task_pb2.Task(
            request_id=request_id, model_version=VERSION, generate=task_pb2.GenerateInput(
                prompt=prompt, sampling=task_pb2.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                                                ignore_eos=True)))))
        ttft = None
        while True:
            output = await queue.get()
            if ttft is None and output.text_delta:
                ttft = time.perf_counter() - started
            if output.finished:
                del self.waiting[request_id]
                return ttft, time.perf_counter() - started


async def measure(args, mesh: LocalMesh) -> dict:
    gateway, worker = Gateway(mesh.gateway, mesh.api_key), Worker(mesh.address("worker"))
    paths = {"gateway": gateway, "worker_direct": worker}
    for path in paths.values():  # warm up both paths (first torch calls, connections)
        await path.run("warm up", args.max_tokens)
    sequential = {name: {"ttft": [], "e2e": []} for name in paths}
    for i in range(args.requests):
        order = list(paths.items()) if i % 2 == 0 else list(reversed(paths.items()))
        for name, path in order:
            ttft, e2e = await path.run(f"Request {i}: tell me about the number {i}.", args.max_tokens)
            sequential[name]["ttft"].append(ttft)
            sequential[name]["e2e"].append(e2e)
    concurrent = {}
    for name, path in paths.items():
        started = time.perf_counter()
        results = await asyncio.gather(*(path.run(f"Concurrent {j}: describe a {j}-sided shape.", args.max_tokens)
                                         for j in range(args.concurrency)))
        wall = time.perf_counter() - started
        concurrent[name] = {"ttft": summary([r[0] for r in results]), "e2e": summary([r[1] for r in results]),
                            "tokens_per_s": round(args.concurrency * args.max_tokens / wall, 1)}
    await gateway.cached("cache warm")
    cache_hits = [await gateway.cached("cache warm") for _ in range(args.requests * 5)]
    out = {name: {"ttft": summary(v["ttft"]), "e2e": summary(v["e2e"])} for name, v in sequential.items()}
    return {
        "setup": {"model": VERSION, "requests": args.requests, "max_tokens": args.max_tokens,
                  "concurrency": args.concurrency, "note": "gateway, scheduler and worker are separate processes "
                  "on this machine, as `make run` starts them; the worker path is one Serve stream"},
        "sequential": out,
        "overhead_ms": {
            "ttft_p50": round(out["gateway"]["ttft"]["p50_ms"] - out["worker_direct"]["ttft"]["p50_ms"], 2),
            "e2e_p50": round(out["gateway"]["e2e"]["p50_ms"] - out["worker_direct"]["e2e"]["p50_ms"], 2),
        },
        f"concurrent_{args.concurrency}": concurrent,
        "gateway_cache_hit": summary(cache_hits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp, LocalMesh(tmp) as mesh:
        result = asyncio.run(measure(args, mesh))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
