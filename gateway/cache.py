"""The response cache (Redis): exact match on (tenant, concrete version, normalized request) for deterministic
requests. Redis trouble never fails a request: the cache then simply misses, and a warning is logged."""

from __future__ import annotations

import hashlib
import json
import time

import redis.asyncio as aioredis

from llmserve.common.logs import get_logger
from llmserve.gateway import metrics
from llmserve.gateway.batching import RedisBatcher

log = get_logger(__name__)

WARN_INTERVAL_S = 30.0


def cache_key(tenant: str, version: str, fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{tenant}\0{version}\0{canonical}".encode()).hexdigest()
    return f"llmserve:cache:v1:{digest}"


def min_json_bytes(value: dict) -> int:
    """A lower bound on the size of `value` as JSON, without serializing it: its texts plus two bytes per number."""
    texts = sum(len(t) + len(r) for t, r in value.get("choices", ()))
    return texts + 2 * sum(len(v) for v in value.get("vectors", ()))


class ResponseCache:
    def __init__(self, client: aioredis.Redis, ttl_s: int, max_entry_bytes: int = 1024 * 1024):
        self.client = client
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes  # larger values are not written (nor serialized, when clearly so)
        self._last_warning = 0.0
        self.batch = RedisBatcher(client)  # the lookups of concurrent requests share a pipeline

    def _warn(self, op: str, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels(op).inc()
        if time.monotonic() - self._last_warning > WARN_INTERVAL_S:
            self._last_warning = time.monotonic()
            log.warning("redis unavailable; serving without the response cache", op=op, error=type(exc).__name__)

    async def get(self, key: str) -> dict | None:
        if self.ttl_s <= 0:
            return None
        try:
            raw = await self.batch.call(lambda c: c.get(key))
        except Exception as exc:
            self._warn("cache_get", exc)
            return None
        return json.loads(raw) if raw else None

    async def put(self, key: str, value: dict) -> bool:
        """Writes the value unless it is over max_entry_bytes; whether it was written."""
        if self.ttl_s <= 0 or min_json_bytes(value) > self.max_entry_bytes:
            return False
        data = json.dumps(value, separators=(",", ":"))
        if len(data) > self.max_entry_bytes:  # ASCII (json escapes the rest): characters are bytes
            return False
        try:
            await self.client.set(key, data, ex=self.ttl_s)
        except Exception as exc:
            self._warn("cache_put", exc)
            return False
        return True
