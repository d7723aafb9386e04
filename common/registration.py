"""Membership in etcd under a lease, refreshed while the process lives: the base of worker and scheduler
registration. Watchers see a member appear when it registers and leave when its lease is revoked (clean stop) or
expires (crash, partition), within the lease's TTL."""

from __future__ import annotations

import asyncio

import aetcd

from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store

log = get_logger(__name__)


class LeasedRegistration:
    """Subclasses write their records under the lease in _put; `fields` name the member in logs."""

    def __init__(self, store: Store, ttl_s: int, name: str):
        self.store, self.ttl_s, self.name = store, ttl_s, name
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task | None = None

    @property
    def fields(self) -> dict:
        return {}

    async def _put(self, lease: aetcd.Lease) -> None:
        raise NotImplementedError

    def _on_tick(self) -> None:
        """Runs before every refresh."""

    async def start(self, retry_in_background: bool = False) -> None:
        """Registers now; with retry_in_background an etcd that does not answer is retried by the refresh loop
        instead of failing the start."""
        try:
            await self._register()
        except Exception as exc:
            if not retry_in_background:
                raise
            log.warning(f"{self.name} registration failed; retrying", error=str(exc))
        self._task = asyncio.create_task(self._keep_registered(), name=f"{self.name} registration")

    async def _register(self) -> None:
        self._lease = await self.store.client.lease(self.ttl_s)
        await self._put(self._lease)
        log.info("registered", **self.fields)

    async def _keep_registered(self) -> None:
        """Refreshes the lease every third of its TTL; registers again if it expired (e.g. etcd was down)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            self._on_tick()
            try:
                reply = await self._lease.refresh() if self._lease is not None else None
                if reply is None or reply.TTL <= 0:
                    log.warning("lease expired; registering again", **self.fields)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; try again next round
                log.warning("lease refresh failed", error=str(exc))

    async def stop(self) -> None:
        """Leaves the watchers' view at once (revokes the lease) rather than after the TTL."""
        if self._task is not None:
            self._task.cancel()
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            except Exception as exc:  # etcd gone: the lease expires by itself
                log.warning("lease revoke failed", error=str(exc))
