"""RedisBatcher against a real Redis: commands of one event-loop turn share a pipeline, each keeps its own reply
and error, a Redis that lost a script gets it again, and admissions stay exact when batched."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from llmserve.gateway.batching import RedisBatcher
from llmserve.gateway.limits import Limit, Limiter, LimitExceeded


@pytest.fixture
async def client(redis_srv):
    c = aioredis.Redis(port=redis_srv.port)
    yield c
    await c.aclose()


async def test_commands_of_one_turn_share_one_pipeline_and_keep_their_own_replies(client):
    prefix = uuid.uuid4().hex
    await client.mset({f"{prefix}:{i}": str(i) for i in range(50)})
    batcher = RedisBatcher(client)
    replies = await asyncio.gather(*(batcher.call(lambda c, i=i: c.get(f"{prefix}:{i}")) for i in range(50)))
    assert replies == [str(i).encode() for i in range(50)]
    assert (batcher.batches, batcher.commands) == (1, 50)
    alone = await batcher.call(lambda c: c.get(f"{prefix}:7"))  # a lone command: a batch of one
    assert alone == b"7" and batcher.batches == 2


async def test_one_failing_command_fails_only_itself(client):
    prefix = uuid.uuid4().hex
    await client.set(f"{prefix}:s", "text")
    batcher = RedisBatcher(client)
    results = await asyncio.gather(batcher.call(lambda c: c.incr(f"{prefix}:s")),  # WRONGTYPE-like: not an integer
                                   batcher.call(lambda c: c.incr(f"{prefix}:n")),
                                   return_exceptions=True)
    assert isinstance(results[0], redis.exceptions.ResponseError) and results[1] == 1


async def test_a_redis_that_is_down_fails_every_command_of_the_batch(redis_srv):
    dead = aioredis.Redis(port=1, socket_connect_timeout=1)  # nothing listens on port 1
    batcher = RedisBatcher(dead)
    results = await asyncio.gather(*(batcher.call(lambda c: c.get("k")) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results)
    await dead.aclose()


async def test_a_cancelled_caller_does_not_break_the_batch(client):
    batcher = RedisBatcher(client)
    first = batcher.call(lambda c: c.ping())
    second = batcher.call(lambda c: c.ping())
    first.cancel()
    assert await second is True
    await batcher.drain()


async def test_batched_admissions_are_exact_and_survive_a_script_flush(client):
    """200 concurrent admissions against a limit of 150 in batches: exactly 150 pass; after SCRIPT FLUSH (a Redis
    restart loses its scripts) batched admissions load the script again and still count exactly."""
    limiter = Limiter(client, fail_open=False)
    key = f"llmserve:rl:{{t-{uuid.uuid4().hex}}}:req"

    def limits():
        return [Limit("requests per minute of tenant t", "w", (key, key + ":sum"), 150, 1)]

    async def one(i: int) -> bool:
        try:
            await limiter.admit(f"r{i}-{uuid.uuid4().hex[:6]}", limits())
            return True
        except LimitExceeded:
            return False
    admitted = await asyncio.gather(*(one(i) for i in range(100)))
    assert sum(admitted) == 100 and limiter.batch.batches < 10
    await client.script_flush()
    admitted = await asyncio.gather(*(one(i) for i in range(100, 200)))
    assert sum(admitted) == 50
    assert int(await client.get(key + ":sum")) == 150
