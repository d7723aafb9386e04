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
from llmserve.common.sources import ModelLoadError, resolve_source
from llmserve.common.state.store import Store
from llmserve.common.state.watcher import PrefixWatcher
from llmserve.dispatch.v1 import worker_pb2, worker_pb2_grpc
from llmserve.worker import metrics
from llmserve.worker.engine.compute import compute_thread
from llmserve.worker.engine.factory import make_engine
from llmserve.worker.engine.paged.block_manager import free_memory_bytes
from llmserve.worker.engine.paged.lora import AdapterError
from llmserve.worker.faults import FaultyEngine
from llmserve.worker.lifecycle import Lifecycle
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
        # The registry's versions, watched for adapters (worker.serve_adapters).
        self._versions: PrefixWatcher[registry_pb2.ModelVersion] | None = None
        self._sync_task: asyncio.Task | None = None
        self._sync_again = False
        self._refused: set[str] = set()
        self._address, self._started = "", 0
        # Fault injection for drills (worker/faults.py) and the lifecycle that follows the registry's assignment.
        self._faults = self.store.faults.watcher()
        self.lifecycle: Lifecycle | None = None

    def _fault(self, version: str) -> registry_pb2.FaultInjection | None:
        return self._faults.snapshot.get(version)

    async def _load(self, version: registry_pb2.ModelVersion) -> ServedModel:
        """Loads a base version into a started engine (on the compute thread), faults applied per version."""
        served = await self.compute.call(load_model, version, self.config)
        served.engine = FaultyEngine(served.engine, version.version, self._fault)
        served.engine.start()
        return served

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
        versions = [await self._registry_version(name) for name in cfg.models]
        # An adapter listed without its base brings the base along (it runs on the base's engine).
        bases = [v.base_version for v in versions if v.base_version and v.base_version not in cfg.models]
        versions += [await self._registry_version(name) for name in dict.fromkeys(bases)]
        self._faults.start()
        await self._faults.wait_ready(5.0)
        for version in versions:
            if not version.base_version:
                self.models[version.version] = await self._load(version)
        for version in versions:
            if version.base_version and not await self._add_adapter(version):
                raise RuntimeError(f"adapter {version.version!r} cannot be served (the log says why)")
        port = await self.service.start()
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{port}"
        self.servicer.worker_id = self.worker_id
        self._address = cfg.advertise_address or f"{cfg.host}:{port}"
        self._started = int(time.time())
        self.registration = Registration(self.store, cfg.lease_ttl_s, self._info(), on_tick=self._export_metrics)
        await self.registration.start()
        self.lifecycle = Lifecycle(self.store, cfg, self.worker_id, self.models, self._load, self._publish,
                                   self.registration.put_placement,
                                   lambda: free_memory_bytes(torch.device(cfg.device)))
        await self.lifecycle.start()
        if cfg.serve_adapters:
            self._versions = self.store.versions.watcher(on_change=self._versions_changed)
            self._versions.start()
        return port

    def _info(self) -> worker_pb2.WorkerInfo:
        """What the scheduler routes by: the loaded versions, less those draining out (lifecycle.hidden)."""
        hidden = self.lifecycle.hidden if self.lifecycle is not None else set()
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, address=self._address, started=self._started,
            models=[worker_pb2.WorkerModel(model_version=m.version.version, max_num_seqs=m.max_num_seqs,
                                           context_length=m.context_length)
                    for m in self.models.values() if m.version.version not in hidden])

    async def _publish(self) -> None:
        if self.registration is not None:
            try:
                await self.registration.update(self._info())
            except Exception as exc:  # etcd away: the next change or re-registration publishes it
                log.warning("registration update failed", error=str(exc))

    # ---- LoRA adapters, following the registry ----

    async def _add_adapter(self, version: registry_pb2.ModelVersion) -> bool:
        """Serves an adapter version on its base's engine, after loading it once (so a broken one is never
        routed to). False, with the reason logged, when it cannot be served."""
        base = self.models.get(version.base_version)
        add = getattr(base.engine, "add_adapter", None) if base is not None else None
        if base is None or add is None:
            log.warning("adapter not served: its base is not on this worker or its engine has no adapters",
                        version=version.version, base_version=version.base_version)
            return False
        try:
            add(version.version, resolve_source(version.weights_source))
            await base.engine.load_adapter(version.version)  # type: ignore[union-attr]
        except (AdapterError, ModelLoadError) as exc:
            base.engine.remove_adapter(version.version)  # type: ignore[union-attr]
            log.warning("adapter not served", version=version.version, error=str(exc))
            return False
        self.models[version.version] = ServedModel(version, base.engine, adapter=version.version)
        log.info("adapter served", version=version.version, base_version=version.base_version)
        return True

    def _versions_changed(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync_adapters(), name="adapter sync")
        else:
            self._sync_again = True

    async def _sync_adapters(self) -> None:
        """Adds the active adapters of the bases served here and drops the ones the registry removed or disabled
        (their running requests finish first), then publishes the new model list."""
        while True:
            self._sync_again = False
            snapshot = self._versions.snapshot if self._versions is not None else {}
            draining = self.lifecycle.hidden if self.lifecycle is not None else set()
            wanted = {name: v for name, v in snapshot.items()
                      if v.base_version and v.state != registry_pb2.MODEL_STATE_DISABLED
                      and v.base_version in self.models and not self.models[v.base_version].adapter
                      and v.base_version not in draining}
            changed = False
            for name in [n for n, m in self.models.items() if m.adapter and n not in wanted]:
                served = self.models.pop(name)
                served.engine.remove_adapter(name)  # type: ignore[union-attr]
                log.info("adapter dropped", version=name)
                changed = True
            for name, version in wanted.items():
                if name not in self.models and name not in self._refused:
                    if await self._add_adapter(version):
                        changed = True
                    else:
                        self._refused.add(name)  # until the registry changes it (a new version id)
            if changed:
                await self._publish()
            if not self._sync_again:
                return

    def _export_metrics(self) -> None:
        for served in self.models.values():
            if served.adapter:
                continue  # its base's engine reports the shared batch
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
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        await self._faults.stop()
        if self._versions is not None:
            await self._versions.stop()
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self.registration is not None:
            await self.registration.stop()
        await self.service.stop(grace_s)
        for served in self.models.values():
            if not served.adapter:
                await served.engine.stop()
        await self.client.close()
