"""The response cache against a real Redis: values over the entry size cap are not written."""

from __future__ import annotations

import redis.asyncio as aioredis

from llmserve.gateway.cache import ResponseCache, cache_key, min_json_bytes


async def test_values_over_the_entry_cap_are_not_written(redis_srv):
    client = aioredis.Redis(port=redis_srv.port)
    cache = ResponseCache(client, ttl_s=60, max_entry_bytes=1000)
    try:
        small = {"prompt_tokens": 3, "completion_tokens": 2, "choices": [("hello", "stop")]}
        texts = {"prompt_tokens": 3, "completion_tokens": 900, "choices": [("x" * 600, "length")] * 2}
        vectors = {"prompt_tokens": 3, "completion_tokens": 0, "vectors": [[0.125] * 200]}  # ~1.2 KB as JSON
        keys = [cache_key("t", "v", {"i": i}) for i in range(3)]
        assert await cache.put(keys[0], small)
        assert await cache.get(keys[0]) == {**small, "choices": [["hello", "stop"]]}
        for key, value in zip(keys[1:], (texts, vectors), strict=True):
            assert not await cache.put(key, value)
            assert await cache.get(key) is None and not await client.exists(key)
    finally:
        await client.aclose()


def test_the_size_bound_never_exceeds_the_json_size():
    import json
    for value in ({"prompt_tokens": 1, "choices": [("é" * 10, "stop"), ("", "length")]},
                  {"prompt_tokens": 1, "vectors": [[0.0] * 7, [1e-30, -2.5]]}):
        assert min_json_bytes(value) <= len(json.dumps(value, separators=(",", ":")))
