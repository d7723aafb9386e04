"""The shared server bootstrap (common/server.py) over real channels: what a caller reads when a request cannot be
decoded, is over the size limit, or meets an unexpected error."""

from __future__ import annotations

import grpc
import pytest

from llmserve.common.server import Service
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc

METHOD = "/llmserve.inference.v1.InferenceService/CreateChatCompletion"
STREAM_METHOD = "/llmserve.inference.v1.InferenceService/StreamChatCompletion"
SECRET = "worker-7 at 10.1.2.3:50061: CUDA error in /opt/engine/sampler.py"


class Servicer(inference_pb2_grpc.InferenceServiceServicer):
    """Echoes the number of messages as the model name; a model named "crash" raises an internal error."""

    async def CreateChatCompletion(self, request, context):
        if request.model == "crash":
            raise RuntimeError(SECRET)
        return pb.CreateChatCompletionResponse(model=str(len(request.messages)))

    async def StreamChatCompletion(self, request, context):
        if request.model == "crash":
            raise RuntimeError(SECRET)
        yield pb.StreamChatCompletionResponse(model=str(len(request.messages)))


@pytest.fixture
async def server():
    async def start(max_request_bytes=None):
        service = Service("test", "127.0.0.1", 0, [inference_pb2_grpc.InferenceService.__name__],
                          max_request_bytes=max_request_bytes)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(Servicer(), service.server)
        port = await service.start()
        started.append(service)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel
    started: list[Service] = []
    channels: list[grpc.aio.Channel] = []
    yield start
    for channel in channels:
        await channel.close()
    for service in started:
        await service.stop(0)


def raw(channel, method=METHOD, stream=False):
    """A call that sends the given bytes as they are."""
    make = channel.unary_stream if stream else channel.unary_unary
    return make(method, request_serializer=lambda b: b,
                response_deserializer=(pb.StreamChatCompletionResponse if stream
                                       else pb.CreateChatCompletionResponse).FromString)


def bad_utf8_request() -> bytes:
    good = pb.CreateChatCompletionRequest(model="m", messages=[pb.ChatMessage(role="user", content="ab")])
    data = good.SerializeToString()
    assert data.count(b"ab") == 1
    return data.replace(b"ab", b"\xff\xfe")


async def test_invalid_utf8_is_invalid_argument_not_internal(server):
    channel = await server()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(channel)(bad_utf8_request())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid UTF-8" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in raw(channel, STREAM_METHOD, stream=True)(bad_utf8_request()):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(channel)(b"\x12\xff")  # a truncated field: not protobuf at all
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in err.value.details()
    # Valid requests still decode.
    ok = pb.CreateChatCompletionRequest(model="m", messages=[pb.ChatMessage(role="user", content="é")])
    assert (await raw(channel)(ok.SerializeToString())).model == "1"


async def test_requests_over_the_limit_are_invalid_argument_and_name_it(server):
    channel = await server(max_request_bytes=1000)
    small = pb.CreateChatCompletionRequest(model="m", messages=[pb.ChatMessage(role="user", content="x" * 900)])
    assert (await raw(channel)(small.SerializeToString())).model == "1"
    big = pb.CreateChatCompletionRequest(model="m", messages=[pb.ChatMessage(role="user", content="x" * 1000)])
    size = big.ByteSize()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(channel)(big.SerializeToString())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"the request is {size} bytes; at most 1000 bytes are accepted")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in raw(channel, STREAM_METHOD, stream=True)(big.SerializeToString()):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000 bytes" in err.value.details()


async def test_internal_errors_reach_the_caller_without_their_text(server):
    channel = await server()
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    for call in (stub.CreateChatCompletion(pb.CreateChatCompletionRequest(model="crash")),
                 stub.StreamChatCompletion(pb.StreamChatCompletionRequest(model="crash"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                async for _ in call:
                    pass
            else:
                await call
        assert err.value.code() == grpc.StatusCode.INTERNAL
        details = err.value.details()
        assert "internal error in /llmserve.inference.v1.InferenceService/" in details
        for leak in ("worker-7", "10.1.2.3", "sampler.py", "CUDA", "RuntimeError"):
            assert leak not in details
