"""Redis commands that concurrent requests issue in the same event-loop turn go to Redis as one pipeline.

redis-py spends more CPU per command (a connection checkout from the pool, packing, a socket write, a read, the
parsing) than the gateway spends on the rest of a cache hit; with many requests in flight the commands of one
turn of the event loop (cache lookups, admission scripts) share one checkout, one write and one read. Nothing
waits to fill a batch: a batch is sent at the end of the turn in which its first command was queued, so a lone
request pays no more than one loop hop; a busy gateway sends bigger batches, not later ones.

Each command keeps its own result and its own error (`raise_on_error=False`): one refused command does not fail
the others. A batch that fails as a whole (Redis down, a timeout) fails each of its commands with that error,
as each would have failed alone. Scripts are sent as EVALSHA, and a script Redis does not know (NOSCRIPT: a
restarted or flushed Redis) is loaded and its command sent again alone.
"""

from __future__ import annotations

import asyncio
import typing

import redis.exceptions

Command = typing.Callable[[typing.Any], typing.Awaitable[typing.Any]]


class RedisBatcher:
    def __init__(self, client, max_batch: int = 256):
        self.client = client
        self.max_batch = max_batch
        self._queue: list[tuple[Command, asyncio.Future, Command | None]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task] = set()
        self.batches = 0  # batches sent (for tests and benchmarks: commands / batches is the batching factor)
        self.commands = 0

    def call(self, command: Command, on_noscript: Command | None = None) -> asyncio.Future:
        """Queues command(client or pipeline) (it issues exactly one Redis command); the future gets its reply.
        on_noscript(client), when given, is what runs instead if Redis answers NOSCRIPT (it loads the script)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, future, on_noscript))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        elif len(self._queue) >= self.max_batch:
            self._flush()
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Command, asyncio.Future, Command | None]]) -> None:
        self.batches += 1
        self.commands += len(batch)
        if len(batch) == 1:
            command, future, on_noscript = batch[0]
            try:
                result = await command(self.client)
            except redis.exceptions.NoScriptError as exc:
                if on_noscript is None:
                    _fail(future, exc)
                else:
                    await self._retry(on_noscript, future)
                return
            except Exception as exc:
                _fail(future, exc)
            else:
                _resolve(future, result)
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for command, _, _ in batch:
                    await command(pipe)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, future, _ in batch:
                _fail(future, exc)
            return
        for (_, future, on_noscript), result in zip(batch, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError) and on_noscript is not None:
                await self._retry(on_noscript, future)
            elif isinstance(result, Exception):
                _fail(future, result)
            else:
                _resolve(future, result)

    async def _retry(self, command: Command, future: asyncio.Future) -> None:
        try:
            _resolve(future, await command(self.client))
        except Exception as exc:
            _fail(future, exc)

    async def drain(self) -> None:
        """Waits for the batches in flight (at shutdown)."""
        self._flush()
        if self._sending:
            await asyncio.wait(set(self._sending))


def _resolve(future: asyncio.Future, result: typing.Any) -> None:
    if not future.done():  # a caller that was cancelled meanwhile no longer waits
        future.set_result(result)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
