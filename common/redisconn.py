"""Redis connections: a blocking pool, so callers wait for a free connection instead of failing past its size,
and short timeouts, so a hung Redis costs a request milliseconds, not seconds."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from llmserve.common.config import RedisConfig


def connect(cfg: RedisConfig, role: str = "accounting") -> aioredis.Redis:
    """role "accounting" (limits, spend, usage: `url`) or "cache" (the response cache: `cache_url`, else `url`)."""
    url = cfg.cache_url or cfg.url if role == "cache" else cfg.url
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=cfg.max_connections, timeout=cfg.timeout_s, socket_timeout=cfg.timeout_s,
        socket_connect_timeout=cfg.timeout_s,
        # One immediate retry on a broken connection (a pooled socket to a Redis that restarted), never on a
        # timeout: a timed-out script may have run, and sending it again would apply it twice.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return aioredis.Redis(connection_pool=pool)
