"""Usage per tenant, model version and UTC day, counted in Redis hashes (usage:<tenant>:<yyyy-mm-dd>).

Fields are "<version>|<counter>". Counting is best effort: Redis trouble never fails a request."""

from __future__ import annotations

import datetime

import redis.asyncio as aioredis

from llmserve.gateway import metrics


def usage_key(tenant: str, day: datetime.date | None = None) -> str:
    day = day or datetime.datetime.now(datetime.timezone.utc).date()
    return f"llmserve:usage:{tenant}:{day.isoformat()}"


class UsageCounter:
    def __init__(self, client: aioredis.Redis):
        self.client = client

    async def record(self, tenant: str, version: str, *, prompt_tokens: int, completion_tokens: int,
                     cache_hit: bool) -> None:
        key = usage_key(tenant)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hincrby(key, f"{version}|requests", 1)
                pipe.hincrby(key, f"{version}|prompt_tokens", prompt_tokens)
                pipe.hincrby(key, f"{version}|completion_tokens", completion_tokens)
                if cache_hit:
                    pipe.hincrby(key, f"{version}|cache_hits", 1)
                pipe.expire(key, 400 * 86400)
                await pipe.execute()
        except Exception:  # noqa: BLE001 - fail open, counted in metrics
            metrics.REDIS_ERRORS.labels("usage").inc()

    async def get(self, tenant: str, day: datetime.date | None = None) -> dict[str, dict[str, int]]:
        raw = await self.client.hgetall(usage_key(tenant, day))
        out: dict[str, dict[str, int]] = {}
        for field, value in raw.items():
            version, _, counter = (field.decode() if isinstance(field, bytes) else field).partition("|")
            out.setdefault(version, {})[counter] = int(value)
        return out
