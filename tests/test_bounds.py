"""Bounded work for every input, against a real mesh (etcd, Redis, registry, scheduler, tiny-Llama worker, gateway):
hostile sizes are refused with INVALID_ARGUMENT before they cost parsing, templating or tokenizing, the gateway
keeps answering meanwhile, and what fails behind the gateway reaches the caller without worker ids or addresses."""

from __future__ import annotations

import asyncio
import copy
import socket
import time

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.gateway.app import GatewayApp
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"
LOST = "tiny-llama-lost-v1"  # served by a worker that one test takes away
CHAT = "/llmserve.inference.v1.InferenceService/CreateChatCompletion"


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    mesh = await start_mesh(make_config(),
                            versions=[generate_version(TINY, f"file:{tiny_llama_dir}", context_length=512),
                                      generate_version(LOST, f"file:{tiny_llama_dir}", context_length=512)],
                            aliases={"tiny": [(TINY, 1)], "lost": [(LOST, 1)]}, worker_models=[[TINY]])
    yield mesh
    await mesh.stop()


def raw_chat(mesh):
    """CreateChatCompletion taking the request already serialized, so a test times only the call."""
    return mesh.channel.unary_unary(CHAT, request_serializer=lambda b: b,
                                    response_deserializer=pb.CreateChatCompletionResponse.FromString)


def empty_messages(count: int) -> bytes:
    messages = [pb.ChatMessage(role="user") for _ in range(count)]
    messages[-1].content = "hi"
    return pb.CreateChatCompletionRequest(model="tiny", messages=messages, n=w.Int32Value(value=16),
                                          skip_cache=True).SerializeToString()


async def test_a_million_empty_messages_are_refused_at_once_and_health_answers_meanwhile(mesh):
    data = empty_messages(1_000_000)
    assert len(data) > 7_500_000  # about 8 MB
    health = health_pb2_grpc.HealthStub(mesh.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    health_ms: list[float] = []

    async def probe(done: asyncio.Event) -> None:
        while not done.is_set():
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.005)

    done = asyncio.Event()
    prober = asyncio.create_task(probe(done))
    try:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_chat(mesh)(data, metadata=mesh.auth, timeout=5)
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        done.set()
        await prober
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"the request is {len(data)} bytes; at most 4194304 bytes are accepted")
    assert elapsed_ms < 100, f"refused after {elapsed_ms:.0f} ms"
    assert health_ms and max(health_ms) < 100, health_ms
    # Under the byte limit, the message count refuses it before any message is read (or templated).
    data = empty_messages(400_000)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_chat(mesh)(data, metadata=mesh.auth, timeout=5)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("messages has 400000 entries; at most 1024 are allowed")
    assert elapsed_ms < 300, f"refused after {elapsed_ms:.0f} ms"
    assert (await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
        model="tiny", messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=w.Int32Value(value=2),
        skip_cache=True), metadata=mesh.auth)).choices  # still serving


async def test_a_prompt_that_cannot_fit_is_refused_by_its_bytes_before_tokenizing(mesh):
    # 512 tokens x 128 bytes: 64 KiB fit at most. 1 MiB of text would take the tokenizer about a second.
    for stub_call, request in [
        (mesh.stub.CreateCompletion, pb.CreateCompletionRequest(model="tiny", prompt="word " * 200_000)),
        (mesh.stub.CreateChatCompletion, pb.CreateChatCompletionRequest(
            model="tiny", messages=[pb.ChatMessage(role="user", content="word " * 200_000)])),
    ]:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub_call(request, metadata=mesh.auth, timeout=10)
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is 1000000 bytes, more than model 'tiny-llama-v1' can take" in err.value.details()
        assert "holds at most 65536 bytes" in err.value.details()
        assert elapsed_ms < 300, f"refused after {elapsed_ms:.0f} ms"


async def test_invalid_utf8_is_invalid_argument(mesh):
    data = pb.CreateChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="ab")]
                                          ).SerializeToString().replace(b"ab", b"\xc3\x28")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_chat(mesh)(data, metadata=mesh.auth, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()


async def test_a_lost_worker_is_not_named_to_the_caller(mesh):
    worker = await mesh.add_worker([LOST])
    call = mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        model="lost", prompt="go on", max_tokens=w.Int32Value(value=400), ignore_eos=True, skip_cache=True),
        metadata=mesh.auth, timeout=30)
    async for chunk in call:
        if chunk.choices and chunk.choices[0].text:
            break
    # The worker dies abruptly: its stream to the scheduler breaks mid-generation.
    worker.registration._task.cancel()
    await worker.service.server.stop(None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "went away" in err.value.details()
    details = err.value.details()
    assert worker.worker_id not in details and "127.0.0.1" not in details and str(worker.service.port) not in details
    assert await mesh.scheduler.view.workers.wait_for(lambda s: worker.worker_id not in s, 10)
    for served in worker.models.values():
        await served.engine.stop()
    mesh.workers.remove(worker)
    await worker.client.close()


async def test_an_unreachable_scheduler_is_not_named_to_the_caller(mesh):
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = copy.deepcopy(mesh.config)
    config.gateway.scheduler_address = f"127.0.0.1:{closed_port}"
    config.gateway.discover_schedulers = False  # only the closed port: the mesh's registered scheduler would answer
    gateway = GatewayApp(config)
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await gateway.view.keys.wait_for(lambda s: len(s) >= 1, 5)
        await gateway.view.tenants.wait_for(lambda s: "test-tenant" in s, 5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inference_pb2_grpc.InferenceServiceStub(channel).CreateCompletion(
                pb.CreateCompletionRequest(model="tiny", prompt="hi", skip_cache=True), metadata=mesh.auth,
                timeout=10)
    finally:
        await channel.close()
        await gateway.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details()
    assert "no worker serves model version 'tiny-llama-v1'" in details
    assert "127.0.0.1" not in details and str(closed_port) not in details and "ipv4" not in details
