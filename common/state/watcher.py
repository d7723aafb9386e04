"""A prefix of etcd mirrored into memory by a watch, keeping the last good snapshot when etcd goes away."""

from __future__ import annotations

import asyncio
import typing

import aetcd

from llmserve.common.logs import get_logger

log = get_logger(__name__)

T = typing.TypeVar("T")


class PrefixWatcher(typing.Generic[T]):
    """Mirrors every key under a prefix into `snapshot` (key suffix -> decoded value).

    Loads the prefix, then watches from the next revision, so no change between the two is lost. If etcd is
    unreachable it keeps the last snapshot (services keep serving what is configured) and retries with backoff.
    Values that fail to decode are skipped and logged, never fatal.
    """

    def __init__(self, client: aetcd.Client, prefix: str, decode: typing.Callable[[bytes], T],
                 on_change: typing.Callable[[], None] | None = None):
        self._client = client
        self._prefix = prefix.rstrip("/") + "/"
        self._decode = decode
        self._on_change = on_change
        self.snapshot: dict[str, T] = {}
        self.ready = asyncio.Event()
        self.connected = False
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch {self._prefix}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def wait_for(self, predicate: typing.Callable[[dict[str, T]], bool], timeout_s: float) -> bool:
        """Waits until predicate(snapshot) holds (checked on every change)."""
        async def _wait():
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.snapshot))
        try:
            await asyncio.wait_for(_wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def _name(self, key: bytes) -> str:
        return key.decode()[len(self._prefix):]

    def _set(self, key: bytes, value: bytes) -> None:
        try:
            self.snapshot[self._name(key)] = self._decode(value)
        except Exception:
            log.warning("undecodable value skipped", key=key.decode(errors="replace"))

    async def _notify(self) -> None:
        if self._on_change:
            self._on_change()
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        backoff = 0.1
        prefix = self._prefix.encode()
        while True:
            watch = None
            try:
                result = await self._client.get_prefix(prefix)
                fresh: dict[str, T] = {}
                self.snapshot, old = fresh, self.snapshot
                for kv in result:
                    self._set(kv.key, kv.value)
                watch = await self._client.watch_prefix(prefix, start_revision=result.header.revision + 1)
                self.connected = True
                if old != self.snapshot or not self.ready.is_set():
                    self.ready.set()
                    await self._notify()
                backoff = 0.1
                async for event in watch:
                    if event.kind == aetcd.EventKind.PUT:
                        self._set(event.kv.key, event.kv.value)
                    else:
                        self.snapshot.pop(self._name(event.kv.key), None)
                    await self._notify()
                raise ConnectionError("watch ended")
            except asyncio.CancelledError:
                if watch is not None:
                    await _quietly(watch.cancel())
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("etcd watch lost; serving the last snapshot", prefix=self._prefix, error=str(exc))
                self.connected = False
                if watch is not None:
                    await _quietly(watch.cancel())
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


async def _quietly(coro) -> None:
    try:
        await asyncio.wait_for(coro, 1.0)
    except Exception:
        pass
