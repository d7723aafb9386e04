"""Worker membership: the worker's WorkerInfo in etcd under a lease, refreshed while it lives.

The scheduler watches the prefix: a worker appears in routing when it registers and leaves it when its lease
is revoked (clean stop) or expires (crash, partition), within the lease's TTL.
"""

from __future__ import annotations

import asyncio
import typing

import aetcd

from llmserve.admin.v1 import registry_pb2
from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import worker_pb2

log = get_logger(__name__)


class Registration:
    def __init__(self, store: Store, ttl_s: int, info: worker_pb2.WorkerInfo,
                 on_tick: typing.Callable[[], None] = lambda: None):
        self.store, self.ttl_s, self.info = store, ttl_s, info
        self._on_tick = on_tick  # runs on every refresh (the worker exports its gauges there)
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task | None = None
        # The worker's placements (its state of each version it was assigned), under the same lease: they go
        # with the worker, and are written again when it registers again.
        self.placements: dict[str, registry_pb2.Placement] = {}

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._keep_registered(), name="worker registration")

    async def _register(self) -> None:
        self._lease = await self.store.client.lease(self.ttl_s)
        await self.store.workers.put(self.info, lease=self._lease)
        for placement in self.placements.values():
            await self.store.placements.put(placement, lease=self._lease)
        log.info("registered", worker_id=self.info.worker_id, models=[m.model_version for m in self.info.models])

    async def update(self, info: worker_pb2.WorkerInfo) -> None:
        """Publishes a changed WorkerInfo (models added or dropped at run time) under the same lease."""
        self.info = info
        if self._lease is not None:
            await self.store.workers.put(info, lease=self._lease)
            log.info("registration updated", worker_id=info.worker_id, models=[m.model_version for m in info.models])

    async def put_placement(self, placement: registry_pb2.Placement) -> None:
        self.placements[placement.version] = placement
        if self._lease is not None:
            await self.store.placements.put(placement, lease=self._lease)

    async def _keep_registered(self) -> None:
        """Refreshes the lease every third of its TTL; registers again if it expired (e.g. etcd was down)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            self._on_tick()
            try:
                reply = await self._lease.refresh() if self._lease is not None else None
                if reply is None or reply.TTL <= 0:
                    log.warning("lease expired; registering again", worker_id=self.info.worker_id)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; try again next round
                log.warning("lease refresh failed", error=str(exc))

    async def stop(self) -> None:
        """Leaves routing at once (revokes the lease) rather than after the TTL."""
        if self._task is not None:
            self._task.cancel()
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            except Exception as exc:  # etcd gone: the lease expires by itself
                log.warning("lease revoke failed", error=str(exc))
