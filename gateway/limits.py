"""Exact request, token and budget limits shared by every gateway replica, in Redis (the accounting Redis: no
eviction, persisted; never the response cache's).

Every limit a request touches (key and tenant requests per minute, key and tenant tokens per minute, tenant
budget) is checked and reserved by ONE Lua script, atomically: either all reservations are made or none. That is
what keeps concurrent replicas from overshooting (check-then-increment from two processes admits both).

Time is Redis' own (`TIME` inside the scripts), never a gateway's: replicas whose clocks disagree still share one
window.

Per-minute limits are sliding windows: a sorted set of "<request id>:<amount>" members scored by admission time,
plus a running sum. A window admits a request only if the sum of the last 60 s plus its amount fits the limit,
so no 60-second interval ever holds more than the limit. Token reservations are prompt tokens + max_tokens (x
choices); when the request ends they are reconciled to the real count, and so is the reserved cost.

A budget reservation is also recorded with an expiry in "<counter>:resv" ("<request id>:<amount>" scored by
expiry, ms): the gateway running the request renews it; one whose gateway died is released by the reaper (and
lazily by the next admission of that counter). A window entry needs no expiry: it leaves its window in 60 s.

Concurrency caps (key and tenant) are in-flight sets: a sorted set of "<request id>:<sequences>" members scored
by lease deadline (ms), plus their running sum. Admission drops the members whose lease passed (requests of a
gateway that died) from both and adds the request if it fits, in the same script as the other limits;
settlement removes it; the gateway running it renews the lease. So the count is exact across replicas, costs
O(log n) per admission, and cannot leak for longer than one lease. Set and sum expire together (twice the
lease after their last touch); a sum found missing beside a non-empty set is counted again from the set.

Settlement (RECONCILE) happens once per request: the script records "<scope>:settled:<request id>" with the
change, so a settlement replayed from the journal after a timeout or a crash changes nothing the second time.
A settlement that finds its reservation already reaped charges the real amount in full.
"""

from __future__ import annotations

import dataclasses
import math
import time

from llmserve.common.logs import get_logger
from llmserve.gateway import metrics
from llmserve.gateway.batching import RedisBatcher
from llmserve.gateway.journal import Journal

log = get_logger(__name__)

WINDOW_MS = 60_000
SETTLED_TTL_S = 7 * 86400  # how long a settlement is remembered (journal replays within it count once)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The sequences in flight in one in-flight set after dropping the leases that passed. zset, sum: keys; now: ms.
_INFLIGHT = """
local function inflight(zset, sum, now)
  local dead = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', zset, '-inf', now) end
  if redis.call('ZCARD', zset) == 0 then
    redis.call('DEL', sum)
    return 0
  end
  local total = redis.call('GET', sum)
  if not total then
    total = 0
    for _, m in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
      total = total + tonumber(string.match(m, ':(%d+)$'))
    end
    redis.call('SET', sum, total, 'PX', math.max(1, redis.call('PTTL', zset)))
    return total
  else
    total = tonumber(total)
    for _, m in ipairs(dead) do total = total - tonumber(string.match(m, ':(%d+)$')) end
  end
  redis.call('SET', sum, total, 'KEEPTTL')
  return total
end
"""

# Releases the expired reservations of one budget counter. counter, resv: keys; now: ms.
_REAP = """
local function reap(counter, resv, now)
  local dead = redis.call('ZRANGEBYSCORE', resv, '-inf', now)
  if #dead == 0 then return 0 end
  local freed = 0
  for _, m in ipairs(dead) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', resv, '-inf', now)
  if freed > 0 then redis.call('DECRBY', counter, freed) end
  return #dead
end
"""

# ARGV: window_ms, request_id, reservation_ttl_ms, lease_ms, then per limit: kind ("w" window | "c" counter |
# "i" in flight), limit, amount, ttl_s. KEYS: per window limit: zset, sum; per counter limit: counter,
# reservations (zset); per in-flight limit: zset, sum.
# Returns {1} when admitted, else {0, index of the failing limit (1-based), retry_after_ms (-1: never fits),
# amount in use}.
ADMIT = _NOW + _REAP + _INFLIGHT + """
local window, rid, resv_ttl, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local limits = {}
local k, a = 1, 5
while a <= #ARGV do
  local l = {kind = ARGV[a], limit = tonumber(ARGV[a + 1]), amount = tonumber(ARGV[a + 2]), ttl = tonumber(ARGV[a + 3])}
  if l.kind == 'w' then
    l.zset, l.sum = KEYS[k], KEYS[k + 1]
    local expired = redis.call('ZRANGEBYSCORE', l.zset, '-inf', now - window)
    if #expired > 0 then
      local freed = 0
      for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', l.zset, '-inf', now - window)
      redis.call('DECRBY', l.sum, freed)
    end
    l.used = tonumber(redis.call('GET', l.sum) or '0')
  elseif l.kind == 'i' then
    l.zset, l.sum = KEYS[k], KEYS[k + 1]
    l.used = inflight(l.zset, l.sum, now)  -- leases nobody renewed (their gateway died) are gone
  else
    l.counter, l.resv = KEYS[k], KEYS[k + 1]
    reap(l.counter, l.resv, now)
    l.used = tonumber(redis.call('GET', l.counter) or '0')
  end
  k = k + 2
  limits[#limits + 1] = l
  a = a + 4
end
for i, l in ipairs(limits) do
  if l.used + l.amount > l.limit then
    if l.amount > l.limit then return {0, i, -1, l.used} end
    if l.kind == 'c' then return {0, i, l.ttl * 1000, l.used} end
    if l.kind == 'i' then return {0, i, 1000, l.used} end
    local need = l.used + l.amount - l.limit
    local members = redis.call('ZRANGE', l.zset, 0, -1, 'WITHSCORES')
    for j = 1, #members, 2 do
      need = need - tonumber(string.match(members[j], ':(%d+)$'))
      if need <= 0 then return {0, i, math.max(1, tonumber(members[j + 1]) + window - now), l.used} end
    end
    return {0, i, window, l.used}
  end
end
for _, l in ipairs(limits) do
  if l.kind == 'i' then
    redis.call('ZADD', l.zset, now + lease, rid .. ':' .. l.amount)
    redis.call('INCRBY', l.sum, l.amount)
    redis.call('PEXPIRE', l.zset, lease * 2)
    redis.call('PEXPIRE', l.sum, lease * 2)
  elseif l.kind == 'w' then
    redis.call('ZADD', l.zset, now, rid .. ':' .. l.amount)
    redis.call('INCRBY', l.sum, l.amount)
    redis.call('PEXPIRE', l.zset, window * 2)
    redis.call('PEXPIRE', l.sum, window * 2)
  else
    redis.call('INCRBY', l.counter, l.amount)
    redis.call('EXPIRE', l.counter, l.ttl + 86400)
    if l.amount > 0 then
      redis.call('ZADD', l.resv, now + resv_ttl, rid .. ':' .. l.amount)
      redis.call('EXPIRE', l.resv, l.ttl + 86400)
    end
  end
end
return {1}
"""

# KEYS[1]: the request's settled marker, then as for ADMIT. ARGV: request_id, settled_ttl_s, then per limit:
# kind, reserved, actual. Returns 1 when applied, 0 when this request was settled before (a replay).
# A window entry that already left its window is not touched (it no longer counts anyway).
RECONCILE = """
local rid = ARGV[1]
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[2])) then return 0 end
local k, a = 2, 3
while a <= #ARGV do
  local kind, reserved, actual = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 'i' then
    -- the slot is free again (a sum that expired apart is counted again by the next admission)
    if redis.call('ZREM', KEYS[k], rid .. ':' .. reserved) == 1 and redis.call('EXISTS', KEYS[k + 1]) == 1 then
      redis.call('DECRBY', KEYS[k + 1], reserved)
    end
  elseif kind == 'w' then
    local old = rid .. ':' .. reserved
    local score = redis.call('ZSCORE', KEYS[k], old)
    if score and reserved ~= actual then
      redis.call('ZREM', KEYS[k], old)
      redis.call('ZADD', KEYS[k], score, rid .. ':' .. actual)
      redis.call('INCRBY', KEYS[k + 1], actual - reserved)
    end
  else
    local counter, resv = KEYS[k], KEYS[k + 1]
    local held = reserved > 0 and redis.call('ZREM', resv, rid .. ':' .. reserved) == 1
    if reserved == 0 or held then
      if reserved ~= actual then redis.call('INCRBY', counter, actual - reserved) end
    elseif actual > 0 then
      -- the reaper already gave the reservation back (its gateway looked dead): charge the real amount
      redis.call('INCRBY', counter, actual)
    end
    if redis.call('TTL', counter) < 0 then redis.call('EXPIRE', counter, 2 * 86400) end
  end
  k = k + 2
  a = a + 3
end
return 1
"""

# KEYS[1]: a reservation or in-flight zset, then keys that live on with it (an in-flight sum); ARGV: ttl_ms,
# member, keep_ms (> 0: every key lives that much longer). Extends a reservation or lease still held (XX).
RENEW = _NOW + """
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
if tonumber(ARGV[3]) > 0 then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, tonumber(ARGV[3])) end
end
return 1
"""

# KEYS: counter, reservations. Returns how many reservations were released.
REAP = _NOW + _REAP + """
return reap(KEYS[1], KEYS[2], now)
"""

RESERVATIONS_SUFFIX = ":resv"


@dataclasses.dataclass
class Limit:
    name: str  # for messages: "requests per minute of key key_ab12"
    kind: str  # "w" sliding window, "c" period counter, "i" in flight (a concurrency cap)
    keys: tuple[str, ...]  # window: zset, sum; counter: counter, reservations; in flight: zset, sum
    limit: int
    amount: int
    measure: str = "requests"  # what amount counts: "requests", "tokens", "cost" (micro-USD) or "sequences"
    ttl_s: int = 0  # counter: seconds left in its period
    hint: str = ""  # how to raise the limit, for the message of a refusal


class LimitExceeded(Exception):
    def __init__(self, limit: Limit, retry_after_s: float | None, used: int = 0):
        self.limit = limit
        self.retry_after_s = retry_after_s  # None: this request can never fit
        self.used = used  # how much of the limit was in use
        super().__init__(limit.name)


class Reservation:
    def __init__(self, request_id: str, limits: list[Limit], scope: str = ""):
        self.request_id = request_id
        self.limits = limits
        self.scope = scope  # key prefix with the tenant's hash tag: where its settled marker lives
        self.settled = False

    @property
    def settled_key(self) -> str:
        return f"{self.scope}:settled:{self.request_id}"

    def held(self) -> list[tuple[tuple[str, ...], str, str]]:
        """(keys to renew, the zset first; member; kind) of every budget reservation and in-flight lease that
        expires unless renewed."""
        return [(lim.keys if lim.kind == "i" else lim.keys[1:], f"{self.request_id}:{lim.amount}", lim.kind)
                for lim in self.limits if lim.kind in ("c", "i") and lim.amount > 0]


class Limiter:
    def __init__(self, client, fail_open: bool = True, journal: Journal | None = None,
                 reservation_ttl_s: float = 60.0, lease_s: float = 15.0):
        self.client = client
        self.fail_open = fail_open  # for request, token and concurrency limits; budgets always fail closed
        self.journal = journal
        self.reservation_ttl_ms = max(1, round(reservation_ttl_s * 1000))
        self.lease_ms = max(1, round(lease_s * 1000))  # in-flight slots: the lease of a running request
        self._admit = client.register_script(ADMIT)
        self._reconcile = client.register_script(RECONCILE)
        self._renew = client.register_script(RENEW)
        self._reap = client.register_script(REAP)
        self.batch = RedisBatcher(client)  # admissions of concurrent requests share a pipeline
        self._last_warning = 0.0
        if journal is not None:
            journal.on("settle", self._replay_settle)

    def _warn(self, exc: Exception, policy: str | None = None) -> None:
        metrics.REDIS_ERRORS.labels("limits").inc()
        if time.monotonic() - self._last_warning > 30:
            self._last_warning = time.monotonic()
            log.warning("redis unavailable for limits",
                        policy=policy or ("fail open" if self.fail_open else "fail closed"), error=type(exc).__name__)

    async def admit(self, request_id: str, limits: list[Limit], scope: str = "llmserve:rl") -> Reservation | None:
        """Reserves every limit or raises LimitExceeded. Returns None when Redis failed and the policy is open
        (never with a budget among the limits: money fails closed, the error is raised)."""
        limits = [lim for lim in limits if lim.limit > 0]
        if not limits:
            return Reservation(request_id, [], scope)
        keys = [k for lim in limits for k in lim.keys]
        args: list[str | int] = [WINDOW_MS, request_id, self.reservation_ttl_ms, self.lease_ms]
        for lim in limits:
            args += [lim.kind, lim.limit, lim.amount, lim.ttl_s]
        try:
            # EVALSHA in a shared pipeline; a Redis that lost the script gets it loaded (Script does) and sent alone.
            result = await self.batch.call(lambda c: c.evalsha(self._admit.sha, len(keys), *keys, *args),
                                           lambda c: self._admit(keys=keys, args=args, client=c))
        except Exception as exc:
            budget = any(lim.kind == "c" for lim in limits)
            self._warn(exc, "fail closed (budget)" if budget else None)
            if self.fail_open and not budget:
                return None
            raise
        if int(result[0]) == 1:
            return Reservation(request_id, limits, scope)
        failed = limits[int(result[1]) - 1]
        retry_ms = int(result[2])
        raise LimitExceeded(failed, None if retry_ms < 0 else retry_ms / 1000, int(result[3]))

    async def reconcile(self, reservation: Reservation | None, actual: dict[str, int]) -> None:
        """actual: new amount per limit name; limits not named keep their reservation (e.g. request counts).
        Applied at most once per reservation; one Redis did not confirm is journaled and replayed later."""
        if reservation is None or not reservation.limits or reservation.settled:
            return
        reservation.settled = True
        keys: list[str] = [reservation.settled_key]
        args: list[str | int] = [reservation.request_id, SETTLED_TTL_S]
        for lim in reservation.limits:
            keys += lim.keys
            args += [lim.kind, lim.amount, actual.get(lim.name, lim.amount)]
        try:
            await self._reconcile(keys=keys, args=args)
        except Exception as exc:  # a timeout too: it may have been applied, and the replay would then do nothing
            self._warn(exc)
            if self.journal is not None:
                self.journal.append({"op": "settle", "id": reservation.request_id, "keys": keys, "args": args})

    async def _replay_settle(self, entry: dict) -> None:
        await self._reconcile(keys=entry["keys"], args=entry["args"])

    async def renew(self, reservations: list[Reservation]) -> None:
        """Pushes the expiry of the budget reservations and in-flight leases of requests still running one TTL
        ahead (in one pipeline)."""
        held = [h for r in reservations if not r.settled for h in r.held()]
        if not held:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, member, kind in held:  # one call per limit: its keys share a cluster slot
                    ttl, keep = (self.lease_ms, 2 * self.lease_ms) if kind == "i" else (self.reservation_ttl_ms, 0)
                    await self._renew(keys=list(keys), args=[ttl, member, keep], client=pipe)
                await pipe.execute()
        except Exception as exc:
            self._warn(exc)

    async def reap(self, match: str = "llmserve:spend:*" + RESERVATIONS_SUFFIX) -> int:
        """Releases expired budget reservations (of requests whose gateway died); how many."""
        released = 0
        async for key in self.client.scan_iter(match=match, count=1000):
            key = key.decode() if isinstance(key, bytes) else key
            released += int(await self._reap(keys=[key.removesuffix(RESERVATIONS_SUFFIX), key]))
        if released:
            log.info("released expired budget reservations", count=released)
        return released


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
