"""Mesh membership for internal services: a shared token in call metadata.

The scheduler and the workers are internal: a caller that reached SchedulerService/Submit directly would skip the
gateway's keys, limits and budgets. So when `security.mesh_token` is set (`llmserve run` generates one per start
and hands it to its processes; Kubernetes mounts it from a Secret), their servers refuse calls without it
(UNAUTHENTICATED), and the mesh's own clients send it. Health checks and reflection stay open for probes and
tooling. This is the floor, not a replacement for mTLS: the token travels in clear text on plain channels.
"""

from __future__ import annotations

import hmac
import typing

import grpc

MESH_TOKEN_HEADER = "x-llmserve-mesh-token"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def mesh_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata that proves mesh membership (empty when the mesh runs without a token)."""
    return ((MESH_TOKEN_HEADER, token),) if token else ()


class MeshTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that do not carry the mesh token (no-op when the token is empty)."""

    def __init__(self, token: str):
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._token or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(MESH_TOKEN_HEADER, "")
        if isinstance(sent, str):
            sent = sent.encode()
        if hmac.compare_digest(sent, self._token):
            return handler
        return _refusal(handler)


_MESSAGE = ("this is an internal service of the mesh: calls need the mesh token (security.mesh_token); clients "
            "call the gateway")


def _refusal(handler) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator: typing.Any, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def refuse_stream(request_or_iterator: typing.Any, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # pragma: no cover  (makes this an async generator)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            fn = refuse_stream if kind.endswith("_stream") else refuse
            return make(fn, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
