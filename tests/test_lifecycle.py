"""Model lifecycle through the whole mesh: a version loaded by the registry's assignment while the old one serves,
routed to once ready, the alias ramped to it, the old one drained and unloaded, under continuous traffic that loses
no request; a version that does not fit in memory is refused with the reason and cannot be routed to."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.registry.lifecycle import state_name
from tests.helpers.mesh import generate_version, start_mesh

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def completion(model: str, user: str, max_tokens: int = 4) -> pb.CreateCompletionRequest:
    return pb.CreateCompletionRequest(model=model, prompt=PROMPT, max_tokens=w.Int32Value(value=max_tokens),
                                      temperature=w.FloatValue(value=0.0), ignore_eos=True, skip_cache=True,
                                      user=user)


async def mesh_with(make_config, tiny_llama_dir, **worker):
    config = make_config()
    config.worker.num_kv_blocks = 64
    # A model load holds the GIL in bursts: on 2 loaded cores the 2 s test lease could lapse meanwhile, and a worker
    # whose lease lapses leaves routing, failing its requests (a crash's cost, not a model update's).
    config.worker.lease_ttl_s = 10
    for name, value in worker.items():
        setattr(config.worker, name, value)
    source = f"file:{tiny_llama_dir}"
    return await start_mesh(config, versions=[generate_version("m-v1", source, context_length=512),
                                              generate_version("m-v2", source, context_length=512)],
                            aliases={"m": [("m-v1", 1)]}, worker_models=[["m-v1"]])


async def wait_state(mesh, version: str, state: str, timeout_s: float = 30) -> rpb.GetModelVersionStatusResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await mesh.admin.GetModelVersionStatus(rpb.GetModelVersionStatusRequest(version=version))
        if state_name(status.state) == state:
            return status
        assert time.monotonic() < deadline, f"{version} is {state_name(status.state)}, not {state}: {status}"
        await asyncio.sleep(0.05)


def split(mesh, **weights: int):
    return mesh.admin.SetAlias(rpb.SetAliasRequest(alias=rpb.Alias(
        name="m", targets=[rpb.TrafficSplit(version=v.replace("_", "-"), weight=n) for v, n in weights.items()])))


async def test_a_model_update_under_load_loses_no_request(make_config, tiny_llama_dir):
    mesh = await mesh_with(make_config, tiny_llama_dir)
    try:
        failures: list[str] = []
        served: dict[str, int] = {}
        stop = asyncio.Event()

        async def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    reply = await mesh.stub.CreateCompletion(completion("m", f"user-{i}-{n}"), metadata=mesh.auth)
                    served[reply.model] = served.get(reply.model, 0) + 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        traffic = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(0.5)
        worker = mesh.workers[0]
        # Loaded beside v1 while v1 serves; routable only once ready.
        await mesh.admin.LoadModelVersion(rpb.LoadModelVersionRequest(version="m-v2"))
        status = await wait_state(mesh, "m-v2", "ready")
        assert [(p.worker_id, state_name(p.state)) for p in status.placements] == [(worker.worker_id, "ready")]
        assert status.placements[0].estimated_bytes > 0 and list(status.pools) == ["default"]
        assert await mesh.scheduler.view.workers.wait_for(
            lambda s: {"m-v1", "m-v2"} <= {m.model_version for m in s[worker.worker_id].models}, 10)
        # Draining v1 is refused while the alias still routes to it.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.DrainModelVersion(rpb.DrainModelVersionRequest(version="m-v1"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "alias(es) m" in err.value.details()
        for v2 in (5, 25, 50, 75):  # the ramp, 0 -> 100 %
            await split(mesh, m_v1=100 - v2, m_v2=v2)
            await asyncio.sleep(0.4)
        await split(mesh, m_v2=100)
        await asyncio.sleep(0.3)
        await mesh.admin.DrainModelVersion(rpb.DrainModelVersionRequest(version="m-v1"))
        await wait_state(mesh, "m-v1", "retired")
        assert "m-v1" not in worker.models and "m-v2" in worker.models  # unloaded: its engine is gone
        assert await mesh.scheduler.view.workers.wait_for(
            lambda s: [m.model_version for m in s[worker.worker_id].models] == ["m-v2"], 10)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*traffic)
        assert failures == [], failures[:5]
        assert served.get("m-v1", 0) > 0 and served.get("m-v2", 0) > 0, served
        # A retired version cannot be routed to until it is loaded again.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await split(mesh, m_v1=1, m_v2=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.value.details()
    finally:
        await mesh.stop()


async def test_a_version_that_does_not_fit_is_refused_with_the_reason(make_config, tiny_llama_dir):
    # The tiny model takes ~12.6 MiB of weights (float32) and 1 MiB of KV cache (64 blocks): one fits in 20 MiB.
    mesh = await mesh_with(make_config, tiny_llama_dir, memory_budget_bytes=20 * 2**20)
    try:
        await mesh.admin.LoadModelVersion(rpb.LoadModelVersionRequest(version="m-v2"))
        status = await wait_state(mesh, "m-v2", "refused")
        reason = status.placements[0].reason
        assert "does not fit" in reason and "memory_budget_bytes=20.0 MiB" in reason and "m-v1 loaded" in reason
        assert status.placements[0].estimated_bytes > status.placements[0].available_bytes
        assert "m-v2" not in mesh.workers[0].models
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await split(mesh, m_v1=9, m_v2=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not fit" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.LoadModelVersion(rpb.LoadModelVersionRequest(version="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.LoadModelVersion(rpb.LoadModelVersionRequest(version="m-v2", pool="Bad Pool"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool=" in err.value.details()
    finally:
        await mesh.stop()
