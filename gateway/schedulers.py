"""The gateway's schedulers: a channel per scheduler replica, picked per task by health and load.

Replicas come from the config (gateway.scheduler_address and gateway.scheduler_addresses, always kept) and from
etcd (schedulers/<id>, registered under each scheduler's lease: watched, never polled). A scheduler that leaves
etcd takes no new tasks; its channel is closed once the tasks on it end. A task goes to the scheduler with the
fewest tasks in flight from this gateway among the healthy ones (channel READY and no failure in the last
cooldown_s; ties in turn), preferring those it has not failed on; with none healthy it waits up to wait_s (and its
deadline) for one to connect, as a restarting scheduler is back in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time

import aetcd
import grpc

from llmserve.common import tls
from llmserve.common.config import SecurityConfig
from llmserve.common.logs import get_logger
from llmserve.common.server import CHANNEL_OPTIONS
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import scheduler_pb2_grpc

log = get_logger(__name__)


@dataclasses.dataclass(eq=False)
class Scheduler:
    """One scheduler replica as this gateway sees it."""
    address: str
    channel: grpc.aio.Channel
    stub: scheduler_pb2_grpc.SchedulerServiceStub
    is_static: bool  # from the config: kept whatever etcd says
    ids: set[str] = dataclasses.field(default_factory=set)  # its registrations in etcd
    num_inflight: int = 0  # this gateway's tasks on it
    failed_at: float = -math.inf  # monotonic time of its last failure (it did not answer)
    is_retired: bool = False  # left etcd: no new tasks; closed once num_inflight is 0

    @property
    def is_ready(self) -> bool:
        return self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY

    def is_cooling(self, cooldown_s: float) -> bool:
        return time.monotonic() - self.failed_at < cooldown_s


class SchedulerPool:
    def __init__(self, client: aetcd.Client, prefix: str, static: list[str], security: SecurityConfig, *,
                 discover: bool = True, cooldown_s: float = 2.0, wait_s: float = 0.0):
        self.security, self.cooldown_s, self.wait_s = security, cooldown_s, wait_s
        self.schedulers: dict[str, Scheduler] = {}  # address -> replica
        for address in dict.fromkeys(static):
            self._add(address, is_static=True)
        self.registered = Store(client, prefix).schedulers.watcher(self._sync) if discover else None
        self._turn = itertools.count()

    async def start(self, timeout_s: float = 5.0) -> None:
        if self.registered is not None:
            self.registered.start()
            await self.registered.wait_ready(timeout_s)  # not loaded yet: the static entries serve meanwhile

    async def stop(self) -> None:
        if self.registered is not None:
            await self.registered.stop()
        await asyncio.gather(*(s.channel.close() for s in self.schedulers.values()), return_exceptions=True)

    # ---- membership ----

    def _add(self, address: str, *, is_static: bool) -> Scheduler:
        channel = tls.aio_channel(address, self.security, "gateway", CHANNEL_OPTIONS,
                                  server_name="" if is_static else self.security.tls_scheduler_server_name)
        channel.get_state(try_to_connect=True)  # dial now, not on its first task
        scheduler = Scheduler(address, channel, scheduler_pb2_grpc.SchedulerServiceStub(channel), is_static)
        self.schedulers[address] = scheduler
        return scheduler

    def _sync(self) -> None:
        """The registrations changed: a channel for each new address, none for those gone (unless static)."""
        assert self.registered is not None
        by_address: dict[str, set[str]] = {}
        for info in self.registered.snapshot.values():
            by_address.setdefault(info.address, set()).add(info.scheduler_id)
        for address, ids in by_address.items():
            scheduler = self.schedulers.get(address)
            if scheduler is None or scheduler.is_retired and scheduler.num_inflight == 0:
                scheduler = self._add(address, is_static=False)
                log.info("scheduler joined", scheduler_ids=sorted(ids), address=address)
            scheduler.ids, scheduler.is_retired = ids, False
        for address, scheduler in list(self.schedulers.items()):
            if address not in by_address and scheduler.ids:
                scheduler.ids = set()
                if not scheduler.is_static:
                    scheduler.is_retired = True
                    log.info("scheduler left", address=address, num_inflight=scheduler.num_inflight)
                    self._close_if_idle(scheduler)

    def _close_if_idle(self, scheduler: Scheduler) -> None:
        if scheduler.is_retired and scheduler.num_inflight == 0 and self.schedulers.get(
                scheduler.address) is scheduler:
            del self.schedulers[scheduler.address]
            asyncio.get_running_loop().create_task(scheduler.channel.close())

    # ---- picking ----

    def live(self) -> list[Scheduler]:
        return [s for s in self.schedulers.values() if not s.is_retired]

    def healthy(self) -> list[Scheduler]:
        return [s for s in self.live() if s.is_ready and not s.is_cooling(self.cooldown_s)]

    async def pick(self, avoid: set[str], remaining: float | None) -> Scheduler:
        """The scheduler for a task's next attempt; avoid: addresses it failed on (taken only if nothing else is)."""
        found = self._least_busy(self.healthy(), avoid)
        if found is None and self.wait_s > 0:
            found = await self._wait_for_one(min(self.wait_s, remaining if remaining is not None else self.wait_s))
        if found is None:  # nothing reachable: the call fails with UNAVAILABLE at once
            live = self.live() or list(self.schedulers.values())
            found = min(live, key=lambda s: (s.address in avoid, s.failed_at))
        return found

    def _least_busy(self, candidates: list[Scheduler], avoid: set[str]) -> Scheduler | None:
        candidates = [s for s in candidates if s.address not in avoid] or candidates
        if not candidates:
            return None
        fewest = min(s.num_inflight for s in candidates)
        tied = sorted((s for s in candidates if s.num_inflight == fewest), key=lambda s: s.address)
        return tied[next(self._turn) % len(tied)]

    async def _wait_for_one(self, timeout_s: float) -> Scheduler | None:
        """The first scheduler whose channel connects within timeout_s (a restarting one is back in seconds)."""
        live = self.live()
        if not live or timeout_s <= 0:
            return None
        waits = {asyncio.ensure_future(s.channel.channel_ready()): s for s in live}
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return next((waits[d] for d in done if not d.cancelled() and d.exception() is None), None)

    @contextlib.contextmanager
    def running(self, scheduler: Scheduler):
        """Counts a task on the scheduler while its Submit stream lasts."""
        scheduler.num_inflight += 1
        try:
            yield scheduler
        finally:
            scheduler.num_inflight -= 1
            self._close_if_idle(scheduler)

    def note_failed(self, scheduler: Scheduler) -> None:
        """The scheduler did not answer (died, unreachable): no new tasks for cooldown_s, unless none is left."""
        scheduler.failed_at = time.monotonic()
        log.warning("scheduler failed", address=scheduler.address, cooldown_s=self.cooldown_s)

