"""Registry process: the admin plane (RegistryService, TenantService, AdminKeyService) over etcd, behind admin
keys."""

from __future__ import annotations

import grpc

from llmserve.admin.v1 import admin_keys_pb2_grpc, keys_pb2, registry_pb2_grpc, tenants_pb2_grpc
from llmserve.common import etcd, redisconn, tls
from llmserve.common.config import MeshConfig
from llmserve.common.server import Service
from llmserve.common.state import keys
from llmserve.common.state.collection import Collection
from llmserve.common.state.store import Store
from llmserve.common.state.watcher import PrefixWatcher
from llmserve.registry.admin_keys import AdminKeyServicer, admin_key_service_name
from llmserve.registry.rollout import Controller
from llmserve.registry.service import RegistryServicer, registry_service_name
from llmserve.registry.tenants import TenantServicer, tenant_service_name

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Admin requests carry small records, and etcd refuses writes over its --max-request-bytes (1.5 MiB by default):
# a larger request is refused before it is parsed (INVALID_ARGUMENT), not by a failed write (INTERNAL). Records are
# stored as JSON (common/state/codec.py), where a character can take 6 bytes ("\u0000"; astral ones 12 for their
# 4), so the cap leaves room for that: 6 x 200 KiB is 1.2 MiB.
MAX_ADMIN_REQUEST_BYTES = 200 * 1024


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every admin RPC needs `authorization: Bearer <admin key>` of an active admin key: not revoked, not expired
    (checked against the clock at each call, so a key expires on time without any change in etcd); tenant keys
    are not admin keys."""

    def __init__(self, watched: PrefixWatcher[keys_pb2.AdminKey], admin_keys: Collection[keys_pb2.AdminKey]):
        self.watched = watched
        self.admin_keys = admin_keys

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            message = ("admin calls need `authorization: Bearer <admin key>` (`llmserve admin-key create`; "
                       "`make run` writes one to .llmserve/admin-key)")
        else:
            # The watch may lag a key created a moment ago (the launcher does exactly that): ask etcd then.
            record = self.watched.snapshot.get(keys.hash_key(key)) or await self._lookup(key)
            if record is None:
                message = "the admin key is unknown"
            elif (refused := keys.refusal(record, "admin key")) is None:
                return await continuation(details)
            else:
                message = f"{refused}; use another admin key (`llmserve admin-key list` shows them)"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return grpc.unary_unary_rpc_method_handler(deny)

    async def _lookup(self, key: str) -> keys_pb2.AdminKey | None:
        try:
            return await keys.lookup(self.admin_keys, key)
        except Exception:
            return None


class RegistryApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        self.client = etcd.connect(config.etcd)
        self.redis = redisconn.connect(config.redis)
        store = Store(self.client, config.etcd.prefix)
        self.admin_keys = store.admin_keys.watcher()
        self.service = Service("registry", config.registry.host, config.registry.port,
                               [registry_service_name(), tenant_service_name(), admin_key_service_name()],
                               interceptors=[AdminAuthInterceptor(self.admin_keys, store.admin_keys)],
                               credentials=tls.server_credentials(config.security, "registry"),
                               max_request_bytes=MAX_ADMIN_REQUEST_BYTES)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(store, self.redis, config.etcd.prefix, config.registry), self.service.server)
        tenants_pb2_grpc.add_TenantServiceServicer_to_server(TenantServicer(store, self.redis), self.service.server)
        admin_keys_pb2_grpc.add_AdminKeyServiceServicer_to_server(AdminKeyServicer(store), self.service.server)
        cfg = config.registry
        self.controller = Controller(store, self.redis, config.etcd.prefix, cfg.controller_tick_s,
                                     cfg.controller_lease_ttl_s) if cfg.controller else None

    async def start(self) -> int:
        self.admin_keys.start()
        await self.admin_keys.wait_ready(5.0)
        if self.controller is not None:
            self.controller.start()
        return await self.service.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.service.stop(grace_s)
        if self.controller is not None:
            await self.controller.stop()
        await self.admin_keys.stop()
        await self.redis.aclose()
        await self.client.close()
