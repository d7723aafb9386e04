"""Scheduler membership: the scheduler's SchedulerInfo in etcd under a lease, refreshed while it lives.

Gateways watch the prefix (gateway/schedulers.py): a scheduler takes tasks once it registers and stops getting them
when its lease is revoked (clean stop) or expires (crash, partition), within the lease's TTL. Nothing else about a
scheduler is shared: its queues are its own and its KV index is rebuilt from each worker's event stream.
"""

from __future__ import annotations

import asyncio

import aetcd

from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import scheduler_pb2

log = get_logger(__name__)


class SchedulerRegistration:
    def __init__(self, store: Store, ttl_s: int, info: scheduler_pb2.SchedulerInfo):
        self.store, self.ttl_s, self.info = store, ttl_s, info
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Registers now; an etcd that does not answer is retried in the background (the scheduler serves the
        gateways that know its address meanwhile)."""
        try:
            await self._register()
        except Exception as exc:
            log.warning("scheduler registration failed; retrying", error=str(exc))
        self._task = asyncio.create_task(self._keep_registered(), name="scheduler registration")

    async def _register(self) -> None:
        self._lease = await self.store.client.lease(self.ttl_s)
        await self.store.schedulers.put(self.info, lease=self._lease)
        log.info("registered", scheduler_id=self.info.scheduler_id, address=self.info.address)

    async def _keep_registered(self) -> None:
        """Refreshes the lease every third of its TTL; registers again if it expired (e.g. etcd was down)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                reply = await self._lease.refresh() if self._lease is not None else None
                if reply is None or reply.TTL <= 0:
                    log.warning("lease expired; registering again", scheduler_id=self.info.scheduler_id)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; try again next round
                log.warning("lease refresh failed", error=str(exc))

    async def stop(self) -> None:
        """Leaves the gateways' choice at once (revokes the lease) rather than after the TTL."""
        if self._task is not None:
            self._task.cancel()
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            except Exception as exc:  # etcd gone: the lease expires by itself
                log.warning("lease revoke failed", error=str(exc))
