"""Server bootstrap shared by every service: health, reflection, error interceptor, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import typing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.common.errors import ServiceError
from llmserve.common.logs import get_logger

log = get_logger(__name__)

SERVER_OPTIONS = [
    # grpcio binds with SO_REUSEPORT by default: a second server on a taken port would silently split traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError into its status and anything unexpected into INTERNAL (logged with its traceback)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, ServiceError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        await context.abort(exc.code, exc.message)
    log.exception("unexpected error", method=method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _wrap_unary(fn, method):
    async def wrapper(request, context):
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
    return wrapper


def _wrap_stream(fn, method):
    async def wrapper(request_or_iterator, context):
        try:
            async for item in fn(request_or_iterator, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
    return wrapper


class Service:
    """A gRPC server with the standard extras. `start()` returns the bound port (bind port 0 in tests)."""

    def __init__(self, name: str, host: str, port: int, service_names: typing.Iterable[str],
                 interceptors: typing.Sequence[grpc.aio.ServerInterceptor] = ()):
        self.name = name
        self.server = grpc.aio.server(interceptors=[*interceptors, ErrorInterceptor()], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self._address = f"{host}:{port}"
        self.port: int = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(self._address)
        await self.server.start()
        await self.set_serving(True)
        log.info("listening", server=self.name, address=self._address.rsplit(":", 1)[0], port=self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, let running streams finish for grace_s, then cancel the rest."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def wait_for_signal() -> None:
    """Returns on SIGINT or SIGTERM (the entry point then shuts down in order)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def start_metrics_server(host: str, port: int) -> int:
    """Prometheus /metrics on host:port (0: disabled). Returns the port or 0."""
    if not port:
        return 0
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return server.server_port
