"""Worker membership: the worker's WorkerInfo in etcd under a lease, refreshed while it lives.

The scheduler watches the prefix: a worker appears in routing when it registers and leaves it when its lease
is revoked (clean stop) or expires (crash, partition), within the lease's TTL.
"""

from __future__ import annotations

import typing

import aetcd

from llmserve.admin.v1 import registry_pb2
from llmserve.common.logs import get_logger
from llmserve.common.registration import LeasedRegistration
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import worker_pb2

log = get_logger(__name__)


class Registration(LeasedRegistration):
    def __init__(self, store: Store, ttl_s: int, info: worker_pb2.WorkerInfo,
                 on_tick: typing.Callable[[], None] = lambda: None):
        super().__init__(store, ttl_s, "worker")
        self.info = info
        self._tick = on_tick  # runs on every refresh (the worker exports its gauges there)
        # The worker's placements (its state of each version it was assigned), under the same lease: they go
        # with the worker, and are written again when it registers again.
        self.placements: dict[str, registry_pb2.Placement] = {}

    @property
    def fields(self) -> dict:
        return {"worker_id": self.info.worker_id, "models": [m.model_version for m in self.info.models]}

    def _on_tick(self) -> None:
        self._tick()

    async def _put(self, lease: aetcd.Lease) -> None:
        await self.store.workers.put(self.info, lease=lease)
        for placement in self.placements.values():
            await self.store.placements.put(placement, lease=lease)

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
