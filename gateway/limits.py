"""Exact request, token and budget limits shared by every gateway replica, in Redis.

Every limit a request touches (key and tenant requests per minute, key and tenant tokens per minute, tenant
budget) is checked and reserved by ONE Lua script, atomically: either all reservations are made or none. That is
what keeps concurrent replicas from overshooting (check-then-increment from two processes admits both).

Per-minute limits are sliding windows: a sorted set of "<request id>:<amount>" members scored by admission time,
plus a running sum. A window admits a request only if the sum of the last 60 s plus its amount fits the limit,
so no 60-second interval ever holds more than the limit. Token reservations are prompt tokens + max_tokens (x
choices); when the request ends they are reconciled to the real count, and so is the reserved cost.
"""

from __future__ import annotations

import dataclasses
import math
import time

from llmserve.common.logs import get_logger
from llmserve.gateway import metrics

log = get_logger(__name__)

WINDOW_MS = 60_000

# ARGV: now_ms, window_ms, request_id, then per limit: kind ("w" window | "c" counter), limit, amount, ttl_s.
# KEYS: per window limit: zset, sum; per counter limit: counter.
# Returns {1} when admitted, else {0, index of the failing limit (1-based), retry_after_ms (-1: never fits)}.
ADMIT = """
local now, window, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local limits = {}
local k, a = 1, 4
while a <= #ARGV do
  local l = {kind = ARGV[a], limit = tonumber(ARGV[a + 1]), amount = tonumber(ARGV[a + 2]), ttl = tonumber(ARGV[a + 3])}
  if l.kind == 'w' then
    l.zset, l.sum = KEYS[k], KEYS[k + 1]
    k = k + 2
    local expired = redis.call('ZRANGEBYSCORE', l.zset, '-inf', now - window)
    if #expired > 0 then
      local freed = 0
      for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', l.zset, '-inf', now - window)
      redis.call('DECRBY', l.sum, freed)
    end
    l.used = tonumber(redis.call('GET', l.sum) or '0')
  else
    l.counter = KEYS[k]
    k = k + 1
    l.used = tonumber(redis.call('GET', l.counter) or '0')
  end
  limits[#limits + 1] = l
  a = a + 4
end
for i, l in ipairs(limits) do
  if l.used + l.amount > l.limit then
    if l.amount > l.limit then return {0, i, -1} end
    if l.kind == 'c' then return {0, i, l.ttl * 1000} end
    local need = l.used + l.amount - l.limit
    local members = redis.call('ZRANGE', l.zset, 0, -1, 'WITHSCORES')
    for j = 1, #members, 2 do
      need = need - tonumber(string.match(members[j], ':(%d+)$'))
      if need <= 0 then return {0, i, math.max(1, tonumber(members[j + 1]) + window - now)} end
    end
    return {0, i, window}
  end
end
for _, l in ipairs(limits) do
  if l.kind == 'w' then
    redis.call('ZADD', l.zset, now, rid .. ':' .. l.amount)
    redis.call('INCRBY', l.sum, l.amount)
    redis.call('PEXPIRE', l.zset, window * 2)
    redis.call('PEXPIRE', l.sum, window * 2)
  else
    redis.call('INCRBY', l.counter, l.amount)
    redis.call('EXPIRE', l.counter, l.ttl + 86400)
  end
end
return {1}
"""

# ARGV: request_id, then per limit: kind, reserved, actual. KEYS as for ADMIT.
# A window entry that already left its window is not touched (it no longer counts anyway).
RECONCILE = """
local rid = ARGV[1]
local k, a = 1, 2
while a <= #ARGV do
  local kind, reserved, actual = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 'w' then
    local old = rid .. ':' .. reserved
    local score = redis.call('ZSCORE', KEYS[k], old)
    if score and reserved ~= actual then
      redis.call('ZREM', KEYS[k], old)
      redis.call('ZADD', KEYS[k], score, rid .. ':' .. actual)
      redis.call('INCRBY', KEYS[k + 1], actual - reserved)
    end
    k = k + 2
  else
    if reserved ~= actual then redis.call('INCRBY', KEYS[k], actual - reserved) end
    k = k + 1
  end
  a = a + 3
end
return 1
"""


@dataclasses.dataclass
class Limit:
    name: str  # for messages: "requests per minute of key key_ab12"
    kind: str  # "w" sliding window, "c" period counter
    keys: tuple[str, ...]
    limit: int
    amount: int
    measure: str = "requests"  # what amount counts: "requests", "tokens" or "cost" (micro-USD)
    ttl_s: int = 0  # counter: seconds left in its period


class LimitExceeded(Exception):
    def __init__(self, limit: Limit, retry_after_s: float | None):
        self.limit = limit
        self.retry_after_s = retry_after_s  # None: this request can never fit
        super().__init__(limit.name)


class Reservation:
    def __init__(self, request_id: str, limits: list[Limit]):
        self.request_id = request_id
        self.limits = limits


class Limiter:
    def __init__(self, client, fail_open: bool = True):
        self.client = client
        self.fail_open = fail_open
        self._admit = client.register_script(ADMIT)
        self._reconcile = client.register_script(RECONCILE)
        self._last_warning = 0.0

    def _warn(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels("limits").inc()
        if time.monotonic() - self._last_warning > 30:
            self._last_warning = time.monotonic()
            log.warning("redis unavailable for limits", policy="fail open" if self.fail_open else "fail closed",
                        error=type(exc).__name__)

    async def admit(self, request_id: str, limits: list[Limit]) -> Reservation | None:
        """Reserves every limit or raises LimitExceeded. Returns None when Redis failed and the policy is open."""
        limits = [lim for lim in limits if lim.limit > 0]
        if not limits:
            return Reservation(request_id, [])
        keys = [k for lim in limits for k in lim.keys]
        args = [int(time.time() * 1000), WINDOW_MS, request_id]
        for lim in limits:
            args += [lim.kind, lim.limit, lim.amount, lim.ttl_s]
        try:
            result = await self._admit(keys=keys, args=args)
        except Exception as exc:
            self._warn(exc)
            if self.fail_open:
                return None
            raise
        if int(result[0]) == 1:
            return Reservation(request_id, limits)
        failed = limits[int(result[1]) - 1]
        retry_ms = int(result[2])
        raise LimitExceeded(failed, None if retry_ms < 0 else retry_ms / 1000)

    async def reconcile(self, reservation: Reservation | None, actual: dict[str, int]) -> None:
        """actual: new amount per limit name; limits not named keep their reservation (e.g. request counts)."""
        if reservation is None or not reservation.limits:
            return
        keys: list[str] = []
        args: list[str | int] = [reservation.request_id]
        for lim in reservation.limits:
            keys += lim.keys
            args += [lim.kind, lim.amount, actual.get(lim.name, lim.amount)]
        try:
            await self._reconcile(keys=keys, args=args)
        except Exception as exc:
            self._warn(exc)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
