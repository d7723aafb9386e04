"""TLS for the mesh, from `security` config: server credentials, channels, and the caller's role.

Every listener and every mesh client builds its credentials here, so that one setting turns TLS on everywhere:
- servers: `server_credentials(security, role, require_client_auth)`; the internal servers (scheduler, workers,
  registry) require a client certificate from the CA (mTLS), the public gateway only asks for one when
  `security.gateway_client_auth` is set (its clients authenticate with API keys);
- clients: `aio_channel(...)` / `channel(...)` dial TLS with this process's certificate when TLS is on, and
  plaintext when it is off (the zero-config default on loopback);
- roles: the common name of a certificate (`llmserve certs` issues one per role); `RoleInterceptor` lets an
  internal server serve only the roles that should call it (the scheduler only gateways, workers only the
  scheduler), with health and reflection open for probes and tooling.
Certificates are read when a process starts; a renewed certificate takes effect on restart.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing

import grpc

from llmserve.common import certs
from llmserve.common.config import SecurityConfig

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA certificates), PEM."""
        out = []
        for what, path in (("certificate", self.cert), ("private key", self.key), ("CA certificates", self.ca)):
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"TLS {what} {path} cannot be read ({exc.strerror}): write the files with "
                                 "`llmserve certs --out DIR` (security.tls: auto reads DIR from security.tls_dir) "
                                 "or point security.tls_cert/tls_key/tls_ca at yours") from None
        return out[0], out[1], out[2]


def is_enabled(security: SecurityConfig) -> bool:
    return security.tls != "off"


def files(security: SecurityConfig, role: str) -> TlsFiles | None:
    """The files of `role` (tls: auto: <tls_dir>/<role>.pem ...; tls: on: the configured ones), or None when off."""
    if security.tls == "off":
        return None
    if security.tls == "auto":
        d = pathlib.Path(security.tls_dir)
        return TlsFiles(certs.cert_path(d, role), certs.key_path(d, role), certs.ca_path(d))
    return TlsFiles(pathlib.Path(security.tls_cert), pathlib.Path(security.tls_key), pathlib.Path(security.tls_ca))


def server_credentials(security: SecurityConfig, role: str, require_client_auth: bool = True
                       ) -> grpc.ServerCredentials | None:
    """Credentials of a listener (None: plaintext). Without required client auth a client may still present a
    certificate; it is then verified against the CA."""
    found = files(security, role)
    if found is None:
        return None
    chain, key, ca = found.read()
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=require_client_auth)


def channel_credentials(security: SecurityConfig, role: str) -> grpc.ChannelCredentials | None:
    """Credentials of a mesh client: verifies the server against the CA and presents this role's certificate."""
    found = files(security, role)
    if found is None:
        return None
    chain, key, ca = found.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def _options(options: typing.Sequence[tuple[str, typing.Any]], server_name: str) -> list[tuple[str, typing.Any]]:
    # The name checked in the server's certificate instead of the target's host (workers are dialled by IP).
    return [*options, ("grpc.ssl_target_name_override", server_name)] if server_name else list(options)


def aio_channel(target: str, security: SecurityConfig, role: str,
                options: typing.Sequence[tuple[str, typing.Any]] = (), server_name: str = "") -> grpc.aio.Channel:
    """An asyncio channel to a mesh service: TLS as `role` when security.tls is on, else plaintext."""
    credentials = channel_credentials(security, role)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, credentials, options=_options(options, server_name))


def channel(target: str, security: SecurityConfig, role: str = "client",
            options: typing.Sequence[tuple[str, typing.Any]] = (), server_name: str = "") -> grpc.Channel:
    """A blocking channel to a mesh service (CLI, launcher): TLS as `role` when security.tls is on."""
    credentials = channel_credentials(security, role)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=_options(options, server_name))


def peer_role(context: grpc.aio.ServicerContext) -> str:
    """The common name of the caller's verified certificate ("" without one)."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Serves only callers whose certificate names one of `roles` (PERMISSION_DENIED otherwise); a no-op when TLS
    is off, when the check is turned off (security.tls_check_roles) or `roles` is empty."""

    def __init__(self, security: SecurityConfig, roles: typing.Collection[str], service: str):
        self._roles = frozenset(roles) if is_enabled(security) and security.tls_check_roles else frozenset()
        self._message = (f"the {service} serves only mesh members with a certificate for "
                         f"{' or '.join(sorted(self._roles))}; clients call the gateway")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._roles or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        return _checked(handler, self._roles, self._message)


def _checked(handler: grpc.RpcMethodHandler, roles: frozenset[str], message: str) -> grpc.RpcMethodHandler:
    async def check(context: grpc.aio.ServicerContext) -> None:
        if peer_role(context) not in roles:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    def unary(fn):
        async def wrapper(request, context):
            await check(context)
            return await fn(request, context)
        return wrapper

    def streaming(fn):
        async def wrapper(request, context):
            await check(context)
            async for item in fn(request, context):
                yield item
        return wrapper

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming))
    for kind, make, wrap in kinds:
        fn = getattr(handler, kind)
        if fn is not None:
            return make(wrap(fn), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
