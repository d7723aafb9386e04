"""etcd access (aetcd). What lives in etcd, and the watches over it, are in llmserve.common.state.

Authentication, from EtcdConfig: TLS (ca_file) with a client certificate (cert_file, key_file) for etcd's
--client-cert-auth, which takes the certificate's common name as the etcd user, and/or a user and password.
aetcd 1.0 dials plaintext only and authenticates once per connection, while etcd's tokens expire after
--auth-token-ttl (300 s) without use and all of them when etcd restarts: so Client dials its own channel (TLS when
configured) and a token interceptor authenticates, renews the token once a minute, and retries a unary call once
when etcd says the token is invalid.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import typing

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

from llmserve.common.config import EtcdConfig

TOKEN_MAX_AGE_S = 60.0  # well inside etcd's default --auth-token-ttl of 300 s
_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"


def _is_authenticate(details: grpc.aio.ClientCallDetails) -> bool:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else method) == _AUTHENTICATE


class _Token:
    """A current etcd auth token for every call's metadata (watch and lease-keepalive streams included)."""

    def __init__(self, username: str, password: str, timeout_s: float):
        self._request = rpc.AuthenticateRequest(name=username, password=password)
        self._timeout_s = timeout_s
        self._token = ""
        self._at = 0.0
        self._lock = asyncio.Lock()
        self.auth: typing.Any = None  # an AuthStub on the same channel (set once the channel exists)
        self._checks: set[asyncio.Future] = set()

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        # One object per kind: grpc.aio files an interceptor under the first kind it is an instance of.
        return [_UnaryUnary(self), _UnaryStream(self), _StreamStream(self)]

    async def _current(self, renew: bool) -> str:
        if renew or time.monotonic() - self._at > TOKEN_MAX_AGE_S:
            async with self._lock:
                if renew or time.monotonic() - self._at > TOKEN_MAX_AGE_S:
                    reply = await self.auth.Authenticate(self._request, timeout=self._timeout_s)
                    self._token, self._at = reply.token, time.monotonic()
        return self._token

    async def details(self, details: grpc.aio.ClientCallDetails, renew: bool = False) -> grpc.aio.ClientCallDetails:
        if _is_authenticate(details):
            return details
        token = await self._current(renew)
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "token"]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, [*metadata, ("token", token)],
                                          details.credentials, details.wait_for_ready)

    def watch(self, call) -> None:
        """After a stream ends: if etcd refused its token (etcd restarted: every token is gone), renew it."""
        self._checks.add(task := asyncio.ensure_future(self._check(call)))
        task.add_done_callback(self._checks.discard)

    async def _check(self, call) -> None:
        if not call.cancelled() and await call.code() == grpc.StatusCode.UNAUTHENTICATED:
            self._at = 0.0


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: _Token):
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(await self.token.details(client_call_details), request)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or _is_authenticate(client_call_details):
                raise
        # The token lapsed (idle, or etcd restarted): a new one, and the call once more.
        return await (await continuation(await self.token.details(client_call_details, renew=True), request))


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: _Token):
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(await self.token.details(client_call_details), request)
        call.add_done_callback(self.token.watch)
        return call


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: _Token):
        self.token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        call = await continuation(await self.token.details(client_call_details), request_iterator)
        call.add_done_callback(self.token.watch)
        return call


class Client(aetcd.Client):
    """aetcd.Client over its own channel: TLS when credentials are given, and the token interceptor with a user."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None, username: str = "", password: str = "",
                 **kwargs):
        super().__init__(**kwargs)  # no username here: _Token authenticates, not aetcd's connect()
        self._credentials = credentials
        self._token = _Token(username, password, float(kwargs.get("timeout") or 5.0)) if username else None

    @_handle_errors  # grpc errors become aetcd's exceptions, as in aetcd.Client.connect
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await super().connect()  # waits for the connection another task is making
            return
        try:
            self._is_connecting = True
            target, options = f"{self._host}:{self._port}", list(self._options.items())
            interceptors = self._token.interceptors() if self._token else None
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
            else:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=options,
                                                       interceptors=interceptors)
            self.auth_stub = rpc.AuthStub(self.channel)
            if self._token:
                self._token.auth = self.auth_stub
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def _read(path: str, setting: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"etcd.{setting}={path} cannot be read ({exc.strerror})") from None


def connect(cfg: EtcdConfig) -> aetcd.Client:
    # aetcd connects lazily on the first call and reconnects after failures.
    if not cfg.ca_file and not cfg.username:
        return aetcd.Client(host=cfg.host, port=cfg.port, timeout=cfg.timeout_s)
    credentials = None
    if cfg.ca_file:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(cfg.ca_file, "ca_file"),
            private_key=_read(cfg.key_file, "key_file") if cfg.key_file else None,
            certificate_chain=_read(cfg.cert_file, "cert_file") if cfg.cert_file else None)
    return Client(credentials, cfg.username, cfg.password, host=cfg.host, port=cfg.port, timeout=cfg.timeout_s)
