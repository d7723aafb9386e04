"""Model lifecycle on a worker, driven by the registry: load what the worker's assignment adds, drain and unload
what it drains, and report each version's state (a Placement under the worker's lease).

The assignment is watched, never polled: `registry/assignments/<pool>` and `registry/assignments/<worker id>`
add versions to worker.models (and may drain any of them). A version is loaded beside the ones being served, after
a memory check (refused with the reason when its estimate does not fit); only once its engine runs does the worker
list it in its WorkerInfo, so the scheduler never routes to a version that is still loading.

Draining keeps the version listed while requests for it still arrive (queued ones included: an alias moved away a
moment ago may still have some in the scheduler's queue), until its engine has been idle for drain_settle_s or
drain_timeout_s passed; then the worker stops listing it, waits for idleness once more (tasks the scheduler sent
before it saw the change), stops the engine and frees its memory: retired.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import pathlib
import time
import typing

from llmserve.admin.v1 import registry_pb2
from llmserve.common.config import WorkerConfig
from llmserve.common.logs import get_logger
from llmserve.common.sources import ModelLoadError, resolve_source
from llmserve.common.state.store import Store
from llmserve.common.state.watcher import PrefixWatcher
from llmserve.worker.service import ServedModel

log = get_logger(__name__)

S = registry_pb2.LifecycleState
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GGUF_EXPANSION = 8  # a 4-bit GGUF is de-quantized to float32 at load (common/sources, worker/models)


@dataclasses.dataclass
class Estimate:
    weights_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def describe(self) -> str:
        return f"{mib(self.total)} (weights {mib(self.weights_bytes)} + KV cache {mib(self.kv_bytes)})"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _folder_weights(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def estimate(version: registry_pb2.ModelVersion, cfg: WorkerConfig, free_bytes: int) -> Estimate:
    """Memory the version takes once loaded: its weight files scaled to the dtype it is loaded in, and its KV cache
    (num_kv_blocks blocks, else kv_cache_fraction of the free memory, as the engine sizes it)."""
    from llmserve.worker.models import resolve_dtype

    path = resolve_source(version.weights_source)
    config: dict[str, typing.Any] = {}
    weights = 0
    if path.is_file() and path.suffix == ".gguf":
        cached = pathlib.Path(cfg.model_cache_dir) / path.stem
        if (cached / "config.json").exists():
            path = cached
        else:
            weights = path.stat().st_size * GGUF_EXPANSION
    elif path.is_file():
        weights = path.stat().st_size
    if path.is_dir():
        weights = _folder_weights(path)
        if (path / "config.json").exists():
            config = json.loads((path / "config.json").read_text())
    stored = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)
    target = DTYPE_BYTES.get(resolve_dtype(cfg.dtype, cfg.device), 4)
    if version.kind == registry_pb2.MODEL_KIND_GENERATE:
        weights = weights * target // stored
        if version.quantization == "int8":
            weights = weights * 3 // 4  # int8 linears plus the bf16 copies kept for wide steps (README figures)
    kv = 0
    if version.kind == registry_pb2.MODEL_KIND_GENERATE:
        if cfg.num_kv_blocks and config:
            heads = config.get("num_attention_heads") or 1
            head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
            kv_heads = config.get("num_key_value_heads") or heads
            kv = (config.get("num_hidden_layers", 0) * 2 * cfg.num_kv_blocks * cfg.block_size * kv_heads * head_dim
                  * target)
        else:
            kv = int(free_bytes * cfg.kv_cache_fraction)
    return Estimate(weights, kv)


class Lifecycle:
    """Follows the worker's assignment. `models` is the worker's served-model table (shared with its servicer);
    `hidden` the versions loaded but not listed (draining); `load(version)` loads a base version into a started
    ServedModel; `publish()` rewrites the WorkerInfo; `placement(record)` stores a Placement under the lease."""

    def __init__(self, store: Store, cfg: WorkerConfig, worker_id: str, models: dict[str, ServedModel],
                 load: typing.Callable[[registry_pb2.ModelVersion], typing.Awaitable[ServedModel]],
                 publish: typing.Callable[[], typing.Awaitable[None]],
                 placement: typing.Callable[[registry_pb2.Placement], typing.Awaitable[None]],
                 free_bytes: typing.Callable[[], int]):
        self.store, self.cfg, self.worker_id, self.models = store, cfg, worker_id, models
        self._load, self._publish, self._placement, self._free_bytes = load, publish, placement, free_bytes
        self.hidden: set[str] = set()
        self.estimates: dict[str, int] = {}  # version -> estimated bytes of what is loaded
        self.refused: dict[str, str] = {}  # version -> reason (until the assignment changes)
        self._drains: dict[str, asyncio.Task] = {}
        self._watch: PrefixWatcher[registry_pb2.Assignment] = store.assignments.watcher(on_change=self._changed)
        self._sync_task: asyncio.Task | None = None
        self._again = False
        self._last: tuple[frozenset, frozenset] | None = None

    async def start(self) -> None:
        free = self._free_bytes()
        for name, served in self.models.items():
            if not served.adapter:
                try:
                    self.estimates[name] = (await asyncio.to_thread(estimate, served.version, self.cfg, free)).total
                except ModelLoadError:
                    self.estimates[name] = 0
                await self._report(name, S.LIFECYCLE_STATE_READY, estimated=self.estimates[name])
        self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()
        for task in [self._sync_task, *self._drains.values()]:
            if task is not None:
                task.cancel()

    def desired(self) -> tuple[set[str], set[str]]:
        """(versions to serve, versions to drain) from worker.models and the pool's and this worker's assignment."""
        wanted, draining = set(self.cfg.models), set[str]()
        for name in (self.cfg.pool, self.worker_id):
            found = self._watch.snapshot.get(name)
            if found is not None:
                wanted.update(found.versions)
                draining.update(found.draining)
        return wanted - draining, draining

    def _changed(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync(), name="lifecycle sync")
        else:
            self._again = True

    async def _sync(self) -> None:
        while True:
            self._again = False
            wanted, draining = self.desired()
            key = (frozenset(wanted), frozenset(draining))
            if key != self._last:
                self.refused = {v: r for v, r in self.refused.items() if v in wanted}  # a new try once re-assigned
                self._last = key
            for name in sorted(wanted):
                if name not in self.models and name not in self.refused and name not in self._drains:
                    await self._add(name)
            for name in sorted(draining):
                served = self.models.get(name)
                if served is not None and not served.adapter and name not in self._drains:
                    self._drains[name] = asyncio.create_task(self._drain(name), name=f"drain {name}")
            if not self._again:
                return

    async def _report(self, name: str, state: int, reason: str = "", estimated: int = 0, available: int = 0):
        try:
            await self._placement(registry_pb2.Placement(
                worker_id=self.worker_id, version=name, state=state, reason=reason, pool=self.cfg.pool,  # type: ignore[arg-type]
                estimated_bytes=estimated, available_bytes=available, updated=int(time.time())))
        except Exception as exc:  # etcd away: the state is reported again on the next change
            log.warning("placement not reported", version=name, error=str(exc))

    async def _add(self, name: str) -> None:
        version = await self.store.versions.get(name)
        if version is None:
            return await self._refuse(name, "is not registered in the registry")
        if version.base_version:
            return  # adapters follow their base (worker.serve_adapters)
        free = self._free_bytes()
        try:
            need = await asyncio.to_thread(estimate, version, self.cfg, free)
        except ModelLoadError as exc:
            return await self._refuse(name, str(exc))
        available = free
        where = f"{mib(free)} of memory is free"
        if self.cfg.memory_budget_bytes:
            left = self.cfg.memory_budget_bytes - sum(self.estimates.values())
            if left < available:
                available = left
                budget = mib(self.cfg.memory_budget_bytes)
                where = (f"{mib(max(0, left))} is left of worker.memory_budget_bytes={budget} "
                         f"({', '.join(sorted(self.estimates)) or 'nothing'} loaded)")
        if need.total > available:
            return await self._refuse(name, f"does not fit: it needs about {need.describe()} and {where}; drain a "
                                            "version or raise the budget", need.total, available)
        await self._report(name, S.LIFECYCLE_STATE_LOADING, estimated=need.total, available=available)
        log.info("loading model version", version=name, estimated_mib=round(need.total / 2**20, 1))
        try:
            served = await self._load(version)
        except Exception as exc:  # a broken version must not take the worker down
            return await self._refuse(name, f"failed to load: {exc}", need.total, available)
        self.models[name] = served
        self.estimates[name] = need.total
        await self._publish()
        await self._report(name, S.LIFECYCLE_STATE_READY, estimated=need.total, available=available)
        log.info("model version ready", version=name)

    async def _refuse(self, name: str, reason: str, estimated: int = 0, available: int = 0) -> None:
        self.refused[name] = reason
        log.warning("model version refused", version=name, reason=reason)
        await self._report(name, S.LIFECYCLE_STATE_REFUSED, f"model version {name!r} {reason}", estimated, available)

    def _busy(self, name: str) -> bool:
        served = self.models.get(name)
        if served is None:
            return False
        load = served.engine.load()
        return load.num_running + load.num_waiting > 0

    async def _idle_for(self, names: list[str], settle_s: float, deadline: float) -> None:
        """Returns once none of the versions' engines had work for settle_s (or at the deadline)."""
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if any(self._busy(n) for n in names):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                return
            await asyncio.sleep(0.05)

    async def _drain(self, name: str) -> None:
        try:
            estimated = self.estimates.get(name, 0)
            await self._report(name, S.LIFECYCLE_STATE_DRAINING, estimated=estimated)
            log.info("draining model version", version=name)
            deadline = time.monotonic() + self.cfg.drain_timeout_s
            group = [name, *(n for n, m in self.models.items() if m.adapter and m.version.base_version == name)]
            await self._idle_for(group, self.cfg.drain_settle_s, deadline)
            self.hidden.update(group)
            await self._publish()
            # Tasks the scheduler sent before it saw the worker stop listing the version still run here.
            await self._idle_for(group, self.cfg.drain_settle_s, deadline + self.cfg.drain_settle_s)
            for adapter in group[1:]:
                served = self.models.pop(adapter, None)
                if served is not None:
                    served.engine.remove_adapter(adapter)  # type: ignore[union-attr]
            served = self.models.pop(name)
            await served.engine.stop()
            del served
            self.estimates.pop(name, None)
            self.hidden.difference_update(group)
            _free_memory(self.cfg.device)
            await self._report(name, S.LIFECYCLE_STATE_RETIRED, reason="", estimated=estimated)
            log.info("model version retired", version=name)
        finally:
            self._drains.pop(name, None)
            self._changed()  # re-assigned meanwhile: load it again


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()
