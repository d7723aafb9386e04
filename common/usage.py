"""Usage and spend in Redis, written by gateways and read by the admin service.

  llmserve:usage:<tenant>:<yyyy-mm-dd>   hash, fields "<key_id>|<version>|<counter>" (integers; cost in micro-USD)
  llmserve:spend:{<tenant>}:<period>      micro-USD spent in a budget period (reserved up front, reconciled after)
"""

from __future__ import annotations

import datetime
import math
import typing

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


async def record(client, rows: typing.Mapping[tuple[str, str, str, str], typing.Mapping[str, int]]) -> None:
    """Adds counters in one round trip. rows: (tenant, day, key_id, version) -> {counter: amount}."""
    async with client.pipeline(transaction=False) as pipe:
        for (tenant, day, key_id, version), counts in rows.items():
            key = f"llmserve:usage:{tenant}:{day}"
            for name, value in counts.items():
                if value:
                    pipe.hincrby(key, f"{key_id}|{version}|{name}", value)
            pipe.expire(key, 400 * 86400)
        await pipe.execute()


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
