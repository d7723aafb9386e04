"""Server bootstrap shared by every service: health, reflection, error interceptor, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import typing

import aetcd.exceptions
import grpc
import redis.exceptions
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.common.enums import undefined_enum
from llmserve.common.errors import ServiceError, invalid_argument
from llmserve.common.logs import get_logger

log = get_logger(__name__)

# Inside the mesh a message carries up to a whole request (a task) or a whole result (embeddings): 64 MiB.
MESH_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A public server reads messages up to this multiple of its request limit, so that a request somewhat over the
# limit is refused with INVALID_ARGUMENT naming the limit (grpc itself would answer RESOURCE_EXHAUSTED, which
# clients read as "retry later"); beyond it grpc refuses the message before it is buffered whole.
TRANSPORT_CEILING_FACTOR = 4

SERVER_OPTIONS = [
    # grpcio binds with SO_REUSEPORT by default: a second server on a taken port would silently split traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MESH_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESH_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def server_options(max_request_bytes: int | None = None) -> list[tuple[str, typing.Any]]:
    """SERVER_OPTIONS, with the receive limit of a public server whose requests are capped at max_request_bytes."""
    if max_request_bytes is None:
        return list(SERVER_OPTIONS)
    ceiling = max_request_bytes * TRANSPORT_CEILING_FACTOR
    return [(k, ceiling if k == "grpc.max_receive_message_length" else v) for k, v in SERVER_OPTIONS]


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESH_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESH_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A peer that restarts (the scheduler, a worker) is dialled again within half a second of coming back. grpc's
    # default backoff (1 s, growing 1.6x) kept gateways failing for seconds after the scheduler was back.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class _Refused:
    """What a request deserializer returns instead of raising: grpc would answer a raising deserializer with
    INTERNAL, but a request that is too large or not valid protobuf (bad UTF-8 in a string) is the caller's to fix."""

    def __init__(self, error: ServiceError):
        self.error = error


def _checked_deserializer(deserialize, max_request_bytes: int | None):
    def wrapper(data: bytes):
        if max_request_bytes is not None and len(data) > max_request_bytes:
            # Refused before parsing: parsing costs event-loop time in proportion to the size.
            return _Refused(invalid_argument(
                f"the request is {len(data)} bytes; at most {max_request_bytes} bytes are accepted: send fewer or "
                "shorter messages, prompts or inputs, or split the request"))
        try:
            request = deserialize(data)
        except DecodeError as exc:
            if "UTF-8" in str(exc):
                return _Refused(invalid_argument("a string field of the request is not valid UTF-8: send text "
                                                 "encoded as UTF-8"))
            return _Refused(invalid_argument("the request is not a valid protobuf message of this method"))
        if (undefined := undefined_enum(request)) is not None:
            return _Refused(invalid_argument(undefined))
        return request
    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError into its status and anything unexpected into INTERNAL (logged with its traceback, never
    sent: the caller reads only that it happened). A unary request that cannot be decoded (bad UTF-8), holds an
    enum value no enum defines (common/enums.py) or is over max_request_bytes is INVALID_ARGUMENT, refused before it
    is handled."""

    def __init__(self, max_request_bytes: int | None = None):
        self.max_request_bytes = max_request_bytes

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary or handler.unary_stream:
            deserializer = handler.request_deserializer
            if deserializer is not None:
                deserializer = _checked_deserializer(deserializer, self.max_request_bytes)
            make, fn, wrap = ((grpc.unary_unary_rpc_method_handler, handler.unary_unary, _wrap_unary)
                              if handler.unary_unary else
                              (grpc.unary_stream_rpc_method_handler, handler.unary_stream, _wrap_stream))
            return make(wrap(fn, method), request_deserializer=deserializer,
                        response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


# grpc carries a status message in a header, percent-encoded (3 bytes per UTF-8 byte outside printable ASCII),
# and clients refuse headers past 8 KiB (at random between 8 and 16 KiB): the caller then reads RESOURCE_EXHAUSTED
# "Stream removed" instead of the answer. Messages quote callers' values, so they are cut to this encoded size.
MAX_STATUS_MESSAGE_BYTES = 4096


def _encoded_size(char: str) -> int:
    return 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode())


def bounded_message(message: str) -> str:
    """The message, its middle cut out when it is long: the field named at the start and the advice at the end
    stay."""
    if len(message) <= MAX_STATUS_MESSAGE_BYTES and sum(map(_encoded_size, message)) <= MAX_STATUS_MESSAGE_BYTES:
        return message

    def prefix_within(text: str, budget: int) -> int:
        used = 0
        for i, char in enumerate(text):
            used += _encoded_size(char)
            if used > budget:
                return i
        return len(text)
    head = prefix_within(message, MAX_STATUS_MESSAGE_BYTES * 2 // 3)
    tail = prefix_within(message[-MAX_STATUS_MESSAGE_BYTES:][::-1], MAX_STATUS_MESSAGE_BYTES // 4)
    return f"{message[:head]}... ({len(message) - head - tail} characters cut) ...{message[len(message) - tail:]}"


# A store that did not answer (down, restarting, or too slow for the call's timeout): the caller may retry, so
# UNAVAILABLE, not INTERNAL (seen during bench/chaos.py's Redis restart: GetUsage answered INTERNAL).
OUTAGES: dict[type[BaseException], str] = {
    redis.exceptions.ConnectionError: "Redis", redis.exceptions.TimeoutError: "Redis",
    aetcd.exceptions.ConnectionFailedError: "etcd", aetcd.exceptions.ConnectionTimeoutError: "etcd",
}


def _outage(exc: BaseException) -> str | None:
    return next((store for kind, store in OUTAGES.items() if isinstance(exc, kind)), None)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, ServiceError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        await context.abort(exc.code, bounded_message(exc.message))
    store = _outage(exc)
    if store is not None:
        log.warning("a store did not answer", method=method, store=store, error=type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{store} did not answer (it may be restarting); retry")
    log.exception("unexpected error", method=method)
    # Neither the exception's text nor its type: they can name internals (addresses, files, another request).
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; it is logged on the server")


def _wrap_unary(fn, method):
    async def wrapper(request, context):
        try:
            if isinstance(request, _Refused):
                raise request.error
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
    return wrapper


def _wrap_stream(fn, method):
    async def wrapper(request_or_iterator, context):
        try:
            if isinstance(request_or_iterator, _Refused):
                raise request_or_iterator.error
            async for item in fn(request_or_iterator, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
    return wrapper


class Service:
    """A gRPC server with the standard extras. `start()` returns the bound port (bind port 0 in tests).

    max_request_bytes caps the unary requests of a public server (INVALID_ARGUMENT beyond it); internal servers
    leave it None and receive up to MESH_MAX_MESSAGE_BYTES. With credentials (common/tls.py) it listens with TLS
    only; without, in plaintext."""

    def __init__(self, name: str, host: str, port: int, service_names: typing.Iterable[str],
                 interceptors: typing.Sequence[grpc.aio.ServerInterceptor] = (), max_request_bytes: int | None = None,
                 credentials: grpc.ServerCredentials | None = None):
        self.name = name
        self._credentials = credentials
        self.server = grpc.aio.server(interceptors=[*interceptors, ErrorInterceptor(max_request_bytes)],
                                      options=server_options(max_request_bytes))
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self._address = f"{host}:{port}"
        self.port: int = 0

    async def start(self) -> int:
        if self._credentials is None:
            self.port = self.server.add_insecure_port(self._address)
        else:
            self.port = self.server.add_secure_port(self._address, self._credentials)
        await self.server.start()
        await self.set_serving(True)
        log.info("listening", server=self.name, address=self._address.rsplit(":", 1)[0], port=self.port,
                 tls=self._credentials is not None)
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
