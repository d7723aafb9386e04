"""The limiter's scripts against a real Redis: whose clock windows use, reservations that expire, settlements
that are applied once however often they are sent."""

from __future__ import annotations

import asyncio
import collections
import time
import types
import uuid

import pytest
import redis.asyncio as aioredis

from llmserve.common import redisconn, usage
from llmserve.common.config import RedisConfig
from llmserve.gateway import limits as limits_mod
from llmserve.gateway.edge import UsageBuffer
from llmserve.gateway.journal import Journal
from llmserve.gateway.limits import RESERVATIONS_SUFFIX, Limit, Limiter, LimitExceeded
from tests.helpers.servers import redis_server, running


def rpm(tenant: str, limit: int) -> Limit:
    key = f"llmserve:rl:{{{tenant}}}:req"
    return Limit("requests per minute", "w", (key, key + ":sum"), limit, 1)


async def admitted(limiter: Limiter, limit: Limit) -> bool:
    try:
        await limiter.admit(uuid.uuid4().hex, [limit])
        return True
    except LimitExceeded:
        return False


async def test_windows_use_redis_clock_not_the_gateways(redis_srv, monkeypatch):
    """A gateway whose clock is 61 s ahead sees every entry of the window as expired if it passes its own time:
    it would admit a second full window. The script reads Redis' TIME, so the two gateways admit 7 together."""
    client = aioredis.Redis(port=redis_srv.port)
    try:
        honest, skewed = Limiter(client), Limiter(client)
        limit = rpm(f"clock{uuid.uuid4().hex[:8]}", 7)
        results = [await admitted(honest, limit) for _ in range(7)]
        ahead = types.SimpleNamespace(time=lambda: time.time() + 61, monotonic=time.monotonic)
        monkeypatch.setattr(limits_mod, "time", ahead)
        results += [await admitted(skewed, limit) for _ in range(7)]
        monkeypatch.undo()
        results += [await admitted(honest, limit) for _ in range(7)]
        assert sum(results) == 7
    finally:
        await client.aclose()


def budget(tenant: str, limit: int, amount: int) -> Limit:
    key = f"llmserve:spend:{{{tenant}}}:test"
    return Limit("budget", "c", (key, key + RESERVATIONS_SUFFIX), limit, amount, measure="cost", ttl_s=3600)


async def test_a_settlement_sent_twice_counts_once(redis_srv, tmp_path):
    """A settlement that timed out may have been applied; the journal then sends it again: no second change."""
    client = aioredis.Redis(port=redis_srv.port)
    journal = Journal(tmp_path).open()
    try:
        limiter = Limiter(client, journal=journal)
        tenant = f"once{uuid.uuid4().hex[:8]}"
        spend = budget(tenant, 1000, 600)
        reservation = await limiter.admit("r1", [spend], f"llmserve:rl:{{{tenant}}}")
        await limiter.reconcile(reservation, {"budget": 250})
        assert int(await client.get(spend.keys[0])) == 250
        journal.append({"op": "settle", "id": "r1", "keys": [reservation.settled_key, *spend.keys],
                        "args": ["r1", 60, "c", 600, 250]})  # the same settlement, as the journal holds it
        assert await journal.replay()
        assert int(await client.get(spend.keys[0])) == 250
    finally:
        journal.close()
        await client.aclose()


async def test_reservations_of_a_dead_gateway_expire_and_a_late_settlement_charges_in_full(redis_srv):
    client = aioredis.Redis(port=redis_srv.port)
    try:
        limiter = Limiter(client, reservation_ttl_s=0.3)
        tenant = f"reap{uuid.uuid4().hex[:8]}"
        scope = f"llmserve:rl:{{{tenant}}}"
        dead = await limiter.admit("dead", [budget(tenant, 1000, 700)], scope)  # its gateway never settles
        kept = await limiter.admit("kept", [budget(tenant, 1000, 200)], scope)  # its gateway renews it
        try:
            await limiter.admit("next", [budget(tenant, 1000, 500)], scope)
            raise AssertionError("admitted over the budget")
        except LimitExceeded:
            pass
        for _ in range(3):
            await asyncio.sleep(0.15)
            await limiter.renew([kept])
        assert await limiter.reap(f"llmserve:spend:{{{tenant}}}:*{RESERVATIONS_SUFFIX}") == 1  # only the dead one
        counter = budget(tenant, 0, 0).keys[0]
        assert int(await client.get(counter)) == 200
        assert await limiter.admit("next", [budget(tenant, 1000, 500)], scope)  # its room is back
        await limiter.reconcile(dead, {"budget": 300})  # the "dead" gateway comes back: the real cost is charged
        await limiter.reconcile(kept, {"budget": 150})
        assert int(await client.get(counter)) == 300 + 150 + 500
    finally:
        await client.aclose()


async def test_an_expired_reservation_is_released_by_the_next_admission(redis_srv):
    client = aioredis.Redis(port=redis_srv.port)
    try:
        limiter = Limiter(client, reservation_ttl_s=0.2)
        tenant = f"lazy{uuid.uuid4().hex[:8]}"
        scope = f"llmserve:rl:{{{tenant}}}"
        await limiter.admit("dead", [budget(tenant, 1000, 900)], scope)
        await asyncio.sleep(0.3)
        assert await limiter.admit("next", [budget(tenant, 1000, 900)], scope)
    finally:
        await client.aclose()


@pytest.fixture
def own_redis():
    """A Redis of the test's own, persisted like the accounting Redis (AOF), to stop, restart and pause."""
    server = redis_server()
    server.args = [a if a != "no" else "yes" for a in server.args]  # --appendonly yes
    with running(server):
        yield server


def usage_rows(tenant: str) -> dict:
    return {(tenant, usage.today().isoformat(), "key_1", "v1"): collections.Counter(requests=1, cost_micro_usd=7)}


async def read_usage(port: int, tenant: str) -> dict[str, int]:
    client = aioredis.Redis(port=port)
    try:
        rows = await usage.read(client, tenant, [usage.today()])
    finally:
        await client.aclose()
    return rows[0][3] if rows else {}


async def test_usage_flushed_while_redis_is_down_is_journaled_and_counted_once_it_is_back(own_redis, tmp_path):
    client = redisconn.connect(RedisConfig(url=f"redis://127.0.0.1:{own_redis.port}/0", timeout_s=0.2))
    journal = Journal(tmp_path).open()
    try:
        buffer = UsageBuffer(client, journal)
        own_redis.stop()
        buffer.pending.update(usage_rows("down"))
        await buffer.flush()
        assert len(journal.entries) == 1 and not buffer.pending
        journal.close()
        journal = Journal(tmp_path).open()  # the gateway restarted: its journal is still there
        buffer = UsageBuffer(client, journal)
        own_redis.start()
        assert await journal.replay()
        assert await journal.replay()
        assert await read_usage(own_redis.port, "down") == {"requests": 1, "cost_micro_usd": 7}
    finally:
        journal.close()
        await client.aclose()


async def test_a_usage_flush_that_timed_out_after_redis_applied_it_is_not_counted_twice(own_redis, tmp_path):
    """A hung Redis (SIGSTOP) makes the flush time out with the command already sent; Redis applies it when it
    wakes up. The old retry of the same rows then added them a second time."""
    client = redisconn.connect(RedisConfig(url=f"redis://127.0.0.1:{own_redis.port}/0", timeout_s=0.2))
    await client.ping()  # connected before the pause: the flush's command reaches Redis' socket
    journal = Journal(tmp_path).open()
    try:
        buffer = UsageBuffer(client, journal)
        buffer.pending.update(usage_rows("hung"))
        own_redis.pause()
        try:
            await buffer.flush()
        finally:
            own_redis.resume()
        for _ in range(3):
            await buffer.flush()
            await journal.replay()
        assert not journal.entries
        assert await read_usage(own_redis.port, "hung") == {"requests": 1, "cost_micro_usd": 7}
    finally:
        journal.close()
        await client.aclose()


def test_each_gateway_has_its_own_journal_and_adopts_those_nobody_owns(tmp_path):
    first, second = Journal(tmp_path).open(), Journal(tmp_path).open()
    assert first.path != second.path
    second.append({"op": "usage", "id": "a"})
    second.close()
    first.close()
    third = Journal(tmp_path).open()
    assert third.entries == [{"op": "usage", "id": "a"}]
    again = Journal(tmp_path).open()  # third owns it now: not adopted twice
    assert again.entries == []
    third.close()
    again.close()
