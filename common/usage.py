"""Usage and spend in Redis, written by gateways and read by the admin service.

  llmserve:usage:<tenant>:<yyyy-mm-dd>   hash, fields "<key_id>|<version>|<counter>" (integers; cost in micro-USD)
  llmserve:spend:{<tenant>}:<period>      micro-USD spent in a budget period (reserved up front, reconciled after)
"""

from __future__ import annotations

import datetime
import math
import typing
import weakref

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_hits", "cost_micro_usd")
MICRO = 1_000_000


def period_name(budget_period: int) -> str:
    """BudgetPeriod enum value -> "day" or "month" (unspecified: month)."""
    return "day" if budget_period == 1 else "month"


def today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def usage_key(tenant: str, day: datetime.date) -> str:
    return f"llmserve:usage:{tenant}:{day.isoformat()}"


def period_id(period: str, day: datetime.date | None = None) -> str:
    """'day' -> 2026-11-28, 'month' -> 2026-11."""
    day = day or today()
    return day.isoformat() if period == "day" else day.strftime("%Y-%m")


def period_seconds_left(period: str, now: datetime.datetime | None = None) -> int:
    now = now or datetime.datetime.now(datetime.UTC)
    if period == "day":
        end = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(),
                                        tzinfo=datetime.UTC)
    else:
        first = now.date().replace(day=1)
        nxt = (first + datetime.timedelta(days=32)).replace(day=1)
        end = datetime.datetime.combine(nxt, datetime.time(), tzinfo=datetime.UTC)
    return max(1, math.ceil((end - now).total_seconds()))


def spend_key(tenant: str, period: str) -> str:
    return f"llmserve:spend:{{{tenant}}}:{period_id(period)}"  # same hash tag as the tenant's rate limits


def cost_micro_usd(prompt_tokens: int, completion_tokens: int, price_prompt_1k: float,
                   price_completion_1k: float) -> int:
    """Cost rounded up to the micro-dollar, so reservations are never below the real cost."""
    return math.ceil((prompt_tokens * price_prompt_1k + completion_tokens * price_completion_1k) * MICRO / 1000
                     - 1e-9)


FLUSH_MARKER_TTL_S = 7 * 86400  # how long a flush id is remembered (a replay within it counts once)
USAGE_TTL_S = 400 * 86400

# KEYS: usage hash, flush marker (same cluster slot: "{<usage key>}:flush:<id>"). ARGV: marker ttl, hash ttl,
# then field, amount pairs. Adds the amounts unless this flush id was applied before; 1 if applied now.
RECORD = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


async def record(client, rows: typing.Mapping[tuple[str, str, str, str], typing.Mapping[str, int]],
                 flush_id: str) -> None:
    """Adds counters in one round trip, at most once per flush_id (a flush that timed out after Redis applied
    it, sent again, adds nothing). rows: (tenant, day, key_id, version) -> {counter: amount}."""
    per_hash: dict[str, list[str | int]] = {}
    for (tenant, day, key_id, version), counts in rows.items():
        fields = per_hash.setdefault(f"llmserve:usage:{tenant}:{day}", [])
        for name, value in counts.items():
            if value:
                fields += [f"{key_id}|{version}|{name}", int(value)]
    script = _record_script(client)
    calls = [([key, f"{{{key}}}:flush:{flush_id}"], [FLUSH_MARKER_TTL_S, USAGE_TTL_S, *fields])
             for key, fields in per_hash.items()]
    if len(calls) == 1:  # the usual flush (one tenant, one day): one EVALSHA, without a pipeline's overhead
        await script(keys=calls[0][0], args=calls[0][1])
        return
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            await script(keys=keys, args=args, client=pipe)
        await pipe.execute()


_RECORD_SCRIPTS: weakref.WeakKeyDictionary[typing.Any, typing.Any] = weakref.WeakKeyDictionary()


def _record_script(client):
    """RECORD registered once per client (registering hashes the script every time)."""
    script = _RECORD_SCRIPTS.get(client)
    if script is None:
        script = _RECORD_SCRIPTS[client] = client.register_script(RECORD)
    return script


async def read(client, tenant: str, days: list[datetime.date]) -> list[tuple[str, str, str, dict[str, int]]]:
    """[(day, key_id, version, counters)] for the given days."""
    rows: list[tuple[str, str, str, dict[str, int]]] = []
    for day in days:
        per: dict[tuple[str, str], dict[str, int]] = {}
        for field, value in (await client.hgetall(usage_key(tenant, day))).items():
            field = field.decode() if isinstance(field, bytes) else field
            key_id, version, counter = field.split("|", 2)
            per.setdefault((key_id, version), {})[counter] = int(value)
        rows.extend((day.isoformat(), k, v, c) for (k, v), c in sorted(per.items()))
    return rows
