"""Worker process: loads its models from the registry's metadata, serves WorkerService, registers in etcd."""

from __future__ import annotations

import asyncio
import socket
import time

import torch

from llmserve.admin.v1 import registry_pb2
from llmserve.common import etcd, tls
from llmserve.common.config import MeshConfig
from llmserve.common.logs import get_logger
from llmserve.common.meshauth import MeshTokenInterceptor
from llmserve.common.server import Service
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import worker_pb2, worker_pb2_grpc
from llmserve.worker import metrics
from llmserve.worker.engine.compute import compute_thread
from llmserve.worker.engine.factory import make_engine
from llmserve.worker.registration import Registration
from llmserve.worker.service import ServedModel, WorkerServicer, worker_service_name

log = get_logger(__name__)


def load_model(version: registry_pb2.ModelVersion, config: MeshConfig) -> ServedModel:
    """Loads one registry version into its engine (blocking; run it on the compute thread)."""
    started = time.monotonic()
    engine = make_engine(version, config.worker)
    log.info("model loaded", version=version.version, seconds=round(time.monotonic() - started, 2))
    return ServedModel(version, engine)


class WorkerApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        cfg = config.worker
        self.compute = compute_thread()  # every torch call of this process runs there (engine/compute.py)
        if cfg.num_threads:
            self.compute.submit(torch.set_num_threads, cfg.num_threads)  # OpenMP's thread count is per thread
        self.client = etcd.connect(config.etcd)
        self.store = Store(self.client, config.etcd.prefix)
        self.models: dict[str, ServedModel] = {}
        # Internal: mTLS when the mesh has TLS, and only the scheduler dispatches.
        self.service = Service("worker", cfg.host, cfg.port, [worker_service_name()],
                               interceptors=[MeshTokenInterceptor(config.security.mesh_token),
                                             tls.RoleInterceptor(config.security, ["scheduler"], "worker")],
                               credentials=tls.server_credentials(config.security, "worker"))
        self.worker_id = ""
        # Registered before the server starts (grpc does not take handlers later); the id is known after binding.
        self.servicer = WorkerServicer("", self.models, cfg.load_report_interval_s,
                                       max_outbox_messages=cfg.max_outbox_messages,
                                       stalled_stream_timeout_s=cfg.stalled_stream_timeout_s)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.service.server)
        self.registration: Registration | None = None

    async def _registry_version(self, name: str, timeout_s: float = 60.0) -> registry_pb2.ModelVersion:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                found = await self.store.versions.get(name)
                if found is not None:
                    return found
                problem = "is not registered"
            except Exception as exc:  # etcd may still be starting
                problem = f"cannot be read ({exc})"
            if time.monotonic() > deadline:
                raise RuntimeError(f"model version {name!r} {problem} in the registry after {timeout_s}s")
            await asyncio.sleep(0.5)

    async def start(self) -> int:
        cfg = self.config.worker
        if not cfg.models:
            raise ValueError("worker.models is empty: list the registry model versions this worker serves")
        for name in cfg.models:
            version = await self._registry_version(name)
            served = await self.compute.call(load_model, version, self.config)
            served.engine.start()
            self.models[name] = served
        port = await self.service.start()
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{port}"
        self.servicer.worker_id = self.worker_id
        info = worker_pb2.WorkerInfo(
            worker_id=self.worker_id, address=cfg.advertise_address or f"{cfg.host}:{port}", started=int(time.time()),
            models=[worker_pb2.WorkerModel(model_version=m.version.version, max_num_seqs=m.max_num_seqs,
                                           context_length=m.context_length) for m in self.models.values()])
        self.registration = Registration(self.store, cfg.lease_ttl_s, info,
                                         on_tick=self._export_metrics)
        await self.registration.start()
        return port

    def _export_metrics(self) -> None:
        for served in self.models.values():
            name, s = served.version.version, served.engine.stats()
            metrics.RUNNING.labels(name).set(s.num_running)
            metrics.WAITING.labels(name).set(s.num_waiting)
            if s.num_kv_blocks:
                metrics.KV_BLOCKS.labels(name, "used").set(s.num_kv_blocks - s.num_free_kv_blocks)
                metrics.KV_BLOCKS.labels(name, "free").set(s.num_free_kv_blocks)
                metrics.KV_BLOCKS.labels(name, "cached").set(s.num_cached_kv_blocks)
                metrics.PREFIX_HIT_TOKENS.labels(name).set(s.num_prefix_hit_tokens)
                metrics.PREEMPTIONS.labels(name).set(s.num_preemptions)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.registration is not None:
            await self.registration.stop()
        await self.service.stop(grace_s)
        for served in self.models.values():
            await served.engine.stop()
        await self.client.close()
