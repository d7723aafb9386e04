"""Redis connections: a blocking pool, so callers wait for a free connection instead of failing past its size,
and short timeouts, so a hung Redis costs a request milliseconds, not seconds."""

from __future__ import annotations

import redis.asyncio as aioredis

from llmserve.common.config import RedisConfig


def connect(cfg: RedisConfig) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url, max_connections=cfg.max_connections, timeout=cfg.timeout_s, socket_timeout=cfg.timeout_s,
        socket_connect_timeout=cfg.timeout_s)
    return aioredis.Redis(connection_pool=pool)
