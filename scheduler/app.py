"""Scheduler process: watches worker membership in etcd, serves SchedulerService, and registers itself so that
gateways find it (several can run at once: gateway/schedulers.py)."""

from __future__ import annotations

import functools
import socket
import time

from llmserve.common import etcd, tls
from llmserve.common.config import MeshConfig
from llmserve.common.logs import get_logger
from llmserve.common.meshauth import MeshTokenInterceptor
from llmserve.common.server import Service
from llmserve.common.state.store import Store
from llmserve.common.state.views import RegistryView
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmserve.scheduler.dispatcher import Dispatcher
from llmserve.scheduler.registration import SchedulerRegistration
from llmserve.scheduler.service import SchedulerServicer, scheduler_service_name
from llmserve.scheduler.workers import WorkerConnection

log = get_logger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class SchedulerApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        cfg = config.scheduler
        self.client = etcd.connect(config.etcd)
        token = config.security.mesh_token
        self.dispatcher = Dispatcher(cfg.max_queue_per_model, cfg.aging_s, worker_wait_s=cfg.worker_wait_s,
                                     connect=functools.partial(WorkerConnection, mesh_token=token,
                                                               security=config.security),
                                     routing=cfg.routing, kv_hit_weight=cfg.kv_hit_weight,
                                     kv_load_weight=cfg.kv_load_weight, kv_pressure_weight=cfg.kv_pressure_weight,
                                     kv_prefill_weight=cfg.kv_prefill_weight,
                                     max_migrations=cfg.max_migrations, worker_silence_s=cfg.worker_silence_s,
                                     engine_of=self._engine_of, preemption=cfg.preemption,
                                     max_queue_per_class=cfg.max_queue_per_class)
        self.view = RegistryView(self.client, config.etcd.prefix, watch_workers=True,
                                 on_workers_change=self._members_changed)
        # Internal: mTLS when the mesh has TLS, and only gateways submit (they checked keys, limits and budgets).
        self.service = Service("scheduler", cfg.host, cfg.port, [scheduler_service_name()],
                               interceptors=[MeshTokenInterceptor(token),
                                             tls.RoleInterceptor(config.security, ["gateway"], "scheduler")],
                               credentials=tls.server_credentials(config.security, "scheduler"))
        servicer = SchedulerServicer(self.dispatcher, max_backlog=cfg.max_backlog_per_request,
                                     slow_consumer_timeout_s=cfg.slow_consumer_timeout_s)
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, self.service.server)
        self.registration: SchedulerRegistration | None = None
        self.scheduler_id = ""

    def _engine_of(self, version: str) -> tuple[str, str]:
        """An adapter version runs on its base's engine, its blocks salted with its name (KV-aware routing)."""
        known = self.view.versions.snapshot.get(version)
        if known is not None and known.base_version:
            return known.base_version, version
        return version, ""

    def _members_changed(self) -> None:
        self.dispatcher.sync_members(self.view.worker_members())

    async def start(self) -> int:
        self.dispatcher.start()
        await self.view.start()
        port = await self.service.start()
        cfg = self.config.scheduler
        self.scheduler_id = cfg.scheduler_id or f"{socket.gethostname()}-{port}"
        address = cfg.advertise_address or ("" if cfg.host in WILDCARD_HOSTS else f"{cfg.host}:{port}")
        if not address:  # 0.0.0.0 is no address to dial: gateways reach it at their gateway.scheduler_address
            log.info("not registered for discovery: set scheduler.advertise_address", host=cfg.host)
            return port
        info = scheduler_pb2.SchedulerInfo(scheduler_id=self.scheduler_id, address=address, started=int(time.time()))
        self.registration = SchedulerRegistration(Store(self.client, self.config.etcd.prefix), cfg.lease_ttl_s,
                                                  info)
        await self.registration.start()  # listening first: a gateway may dial it as soon as it sees the key
        return port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.registration is not None:
            await self.registration.stop()  # gateways pick another scheduler for new tasks while these drain
        await self.service.stop(grace_s)
        await self.view.stop()
        await self.dispatcher.stop()
        await self.client.close()
