"""The mesh token: internal servers refuse calls without it, accept the mesh's own, and leave health open."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common.meshauth import MESH_TOKEN_HEADER, MeshTokenInterceptor, mesh_metadata
from llmserve.common.server import Service
from llmserve.dispatch.v1 import task_pb2, worker_pb2, worker_pb2_grpc
from llmserve.worker.service import WorkerServicer, worker_service_name


async def _worker(token: str) -> tuple[Service, str]:
    service = Service("worker", "127.0.0.1", 0, [worker_service_name()], interceptors=[MeshTokenInterceptor(token)])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer("w", {}, 60.0), service.server)
    port = await service.start()
    return service, f"127.0.0.1:{port}"


async def _serve_one(address: str, metadata) -> task_pb2.TaskOutput:
    """One task on the worker's Serve stream (it serves no model, so a passing call gets its UNAVAILABLE output)."""
    task = task_pb2.Task(request_id="t", model_version="m", generate=task_pb2.GenerateInput(prompt="hi"))
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Serve(metadata=metadata, timeout=10)
        await call.write(worker_pb2.ServeRequest(task=task))
        async for message in call:
            if message.HasField("output"):
                await call.done_writing()
                return message.output
    raise AssertionError("no output")


async def test_calls_without_the_token_or_with_a_wrong_one_are_unauthenticated():
    service, address = await _worker("s3cret")
    try:
        for metadata in ((), ((MESH_TOKEN_HEADER, "wrong"),), ((MESH_TOKEN_HEADER, ""),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _serve_one(address, metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "s3cret" not in (err.value.details() or "")
        output = await _serve_one(address, mesh_metadata("s3cret"))
        assert output.error.code == grpc.StatusCode.UNAVAILABLE.value[0]  # past the check: the worker's answer
        async with grpc.aio.insecure_channel(address) as channel:  # probes need no token
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop(0)


async def test_an_empty_token_checks_nothing():
    service, address = await _worker("")
    try:
        output = await _serve_one(address, ())
        assert output.finished
        assert mesh_metadata("") == ()
    finally:
        await service.stop(0)
