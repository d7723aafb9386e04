"""etcd access (aetcd). What lives in etcd, and the watches over it, are in llmserve.common.state.

Authentication, from EtcdConfig: a user and password (aetcd authenticates and sends the token with every call),
and/or TLS (ca_file), with a client certificate (cert_file, key_file) for etcd's --client-cert-auth, which takes
the certificate's common name as the etcd user. aetcd 1.0 dials plaintext only; TlsClient is its connect() with a
TLS channel.
"""

from __future__ import annotations

import pathlib

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

from llmserve.common.config import EtcdConfig


class TlsClient(aetcd.Client):
    """aetcd.Client over TLS (the body of aetcd 1.0's connect(), with a secure channel)."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs):
        super().__init__(**kwargs)
        self._credentials = credentials

    @_handle_errors  # grpc errors become aetcd's exceptions, as in aetcd.Client.connect
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await super().connect()  # waits for the connection another task is making
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                   options=list(self._options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", reply.token),)
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
    auth = dict(username=cfg.username, password=cfg.password) if cfg.username else {}
    if not cfg.ca_file:
        return aetcd.Client(host=cfg.host, port=cfg.port, timeout=cfg.timeout_s, **auth)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.ca_file, "ca_file"),
        private_key=_read(cfg.key_file, "key_file") if cfg.key_file else None,
        certificate_chain=_read(cfg.cert_file, "cert_file") if cfg.cert_file else None)
    return TlsClient(credentials, host=cfg.host, port=cfg.port, timeout=cfg.timeout_s, **auth)
