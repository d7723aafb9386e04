"""Worker process: loads its models from the registry's metadata, serves WorkerService, registers in etcd."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import time

import torch

from llmserve.admin.v1 import registry_pb2
from llmserve.common import etcd
from llmserve.common.config import MeshConfig
from llmserve.common.logs import get_logger
from llmserve.common.server import Service
from llmserve.dispatch.v1 import worker_pb2, worker_pb2_grpc
from llmserve.registry.store import Paths, RegistryStore, encode
from llmserve.worker import metrics
from llmserve.worker.embedding import EmbeddingEngine
from llmserve.worker.paged_engine import PagedEngine
from llmserve.worker.models import load_embedding_model, load_generation_model, resolve_source
from llmserve.worker.trtllm import TensorRTLLMEngine
from llmserve.worker.service import ServedModel, WorkerServicer, worker_service_name

log = get_logger(__name__)


def load_model(version: registry_pb2.ModelVersion, config: MeshConfig) -> ServedModel:
    """Loads one registry version into an engine (blocking; run it in a thread)."""
    cfg = config.worker
    started = time.monotonic()
    if version.engine == "tensorrt_llm":
        if version.kind != registry_pb2.MODEL_KIND_GENERATE:
            raise RuntimeError(f"{version.version}: the tensorrt_llm engine serves generation models only")
        engine = TensorRTLLMEngine.from_pretrained(version.version, str(resolve_source(version.weights_source)),
                                        max_num_seqs=cfg.max_num_seqs, context_length=version.context_length)
    elif version.kind == registry_pb2.MODEL_KIND_EMBED:
        model, tokenizer = load_embedding_model(version.weights_source, device=cfg.device)
        engine = EmbeddingEngine(model, tokenizer, max_batch_size=version.max_batch_size or 32,
                                 max_wait_ms=version.max_wait_ms or 5)
    else:
        model, tokenizer = load_generation_model(version.weights_source, pathlib.Path(cfg.model_cache_dir),
                                                 device=cfg.device, dtype=cfg.dtype)
        engine = PagedEngine(model, tokenizer, max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size,
                             num_kv_blocks=cfg.num_kv_blocks or None, kv_cache_fraction=cfg.kv_cache_fraction,
                             max_num_batched_tokens=cfg.max_num_batched_tokens,
                             enable_prefix_caching=cfg.enable_prefix_caching)
    log.info("model loaded", version=version.version, seconds=round(time.monotonic() - started, 2))
    return ServedModel(version, engine)


class WorkerApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        cfg = config.worker
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.client = etcd.connect(config.etcd)
        self.store = RegistryStore(self.client, config.etcd.prefix)
        self.paths = Paths(config.etcd.prefix)
        self.models: dict[str, ServedModel] = {}
        self.service = Service("worker", cfg.host, cfg.port, [worker_service_name()])
        self.worker_id = ""
        # Registered before the server starts (grpc does not take handlers later); the id is known after binding.
        self.servicer = WorkerServicer("", self.models, cfg.load_report_interval_s)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.service.server)
        self._lease = None
        self._keepalive: asyncio.Task | None = None

    async def _registry_version(self, name: str, timeout_s: float = 60.0) -> registry_pb2.ModelVersion:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                found = await self.store.get_version(name)
                if found is not None:
                    return found
                problem = "is not registered"
            except Exception as exc:  # noqa: BLE001 - etcd may still be starting
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
            served = await asyncio.to_thread(load_model, version, self.config)
            served.engine.start()
            self.models[name] = served
        port = await self.service.start()
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{port}"
        self.servicer.worker_id = self.worker_id
        self.info = worker_pb2.WorkerInfo(
            worker_id=self.worker_id, address=cfg.advertise_address or f"{cfg.host}:{port}", started=int(time.time()),
            models=[worker_pb2.WorkerModel(model_version=m.version.version, max_num_seqs=m.max_num_seqs,
                                           context_length=m.context_length) for m in self.models.values()])
        await self._register()
        self._keepalive = asyncio.create_task(self._keep_registered())
        return port

    async def _register(self) -> None:
        self._lease = await self.client.lease(self.config.worker.lease_ttl_s)
        await self.client.put((self.paths.workers + self.worker_id).encode(), encode(self.info), lease=self._lease)
        log.info("registered", worker_id=self.worker_id, models=list(self.models))

    async def _keep_registered(self) -> None:
        """Refreshes the lease every third of its TTL; re-registers if it expired (e.g. etcd was down)."""
        interval = self.config.worker.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            for served in self.models.values():
                self._export_metrics(served)
            try:
                reply = await self._lease.refresh()
                if reply is None or reply.TTL <= 0:
                    log.warning("lease expired; registering again", worker_id=self.worker_id)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; try again next round
                log.warning("lease refresh failed", error=str(exc))

    @staticmethod
    def _export_metrics(served: ServedModel) -> None:
        name = served.version.version
        load = served.load()
        metrics.RUNNING.labels(name).set(load.num_running)
        metrics.WAITING.labels(name).set(load.num_waiting)
        stats = getattr(served.engine, "stats", None)
        if stats is None:
            return
        s = stats()
        metrics.KV_BLOCKS.labels(name, "used").set(s["num_kv_blocks"] - s["num_free_kv_blocks"])
        metrics.KV_BLOCKS.labels(name, "free").set(s["num_free_kv_blocks"])
        metrics.KV_BLOCKS.labels(name, "cached").set(s["num_cached_kv_blocks"])
        metrics.PREFIX_HIT_TOKENS.labels(name).set(s["num_prefix_hit_tokens"])
        metrics.PREEMPTIONS.labels(name).set(s["num_preemptions"])

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._keepalive:
            self._keepalive.cancel()
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)  # leave routing at once, not after the TTL
            except Exception:  # noqa: BLE001
                pass
        await self.service.stop(grace_s)
        for served in self.models.values():
            await served.engine.stop()
        await self.client.close()
