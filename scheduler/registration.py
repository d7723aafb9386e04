"""Scheduler membership: the scheduler's SchedulerInfo in etcd under a lease, refreshed while it lives.

Gateways watch the prefix (gateway/schedulers.py): a scheduler takes tasks once it registers and stops getting them
when its lease is revoked (clean stop) or expires (crash, partition), within the lease's TTL. Nothing else about a
scheduler is shared: its queues are its own and its KV index is rebuilt from each worker's event stream.
"""

from __future__ import annotations

import aetcd

from llmserve.common.registration import LeasedRegistration
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import scheduler_pb2


class SchedulerRegistration(LeasedRegistration):
    def __init__(self, store: Store, ttl_s: int, info: scheduler_pb2.SchedulerInfo):
        super().__init__(store, ttl_s, "scheduler")
        self.info = info

    @property
    def fields(self) -> dict:
        return {"scheduler_id": self.info.scheduler_id, "address": self.info.address}

    async def start(self, retry_in_background: bool = True) -> None:
        """Registers now; an etcd that does not answer is retried in the background (the scheduler serves the
        gateways that know its address meanwhile)."""
        await super().start(retry_in_background)

    async def _put(self, lease: aetcd.Lease) -> None:
        await self.store.schedulers.put(self.info, lease=lease)
