"""A/B statistics per version and per alias arm, summed over every gateway replica in Redis.

Each gateway adds its requests' counts to two Redis hashes per request (batched: gateway/experiments.py):
  llmserve:exp:<etcd prefix>:v:<version>            the version's own figures
  llmserve:exp:<etcd prefix>:a:<alias>:<version>    what one alias sent to that version (an arm)
with integer fields only (HINCRBY, so replicas' additions commute): requests, err:<CODE>, server_errors,
prompt_tokens, completion_tokens, cost_micro, cache_hits, and two latency histograms over the fixed BOUNDS below
(ttft_b<i>, latency_b<i>, with _count and _sum_us). Quantiles are read from the summed buckets by linear
interpolation inside the bucket holding the rank, as Prometheus' histogram_quantile does: exact up to the bucket
width (a p95 of 0.12 s is known to lie in (0.1, 0.15]). A window's figures (a rollout step) are the difference
of two readings of the cumulative counters.
"""

from __future__ import annotations

import typing

from llmserve.admin.v1 import registry_pb2

BOUNDS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
          10.0, 20.0, 30.0, 60.0, float("inf"))
METHOD = ("fixed histogram buckets (upper bounds " + ", ".join(f"{b:g}" for b in BOUNDS[:-1]) + ", +Inf seconds) "
          "summed over gateway replicas in Redis; quantiles by linear interpolation inside the bucket holding the "
          "rank (as Prometheus histogram_quantile)")
# Codes that are the server's fault, not the caller's: the error rate a rollout judges counts only these.
SERVER_ERRORS = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS", "ABORTED"})


def version_key(prefix: str, version: str) -> str:
    return f"llmserve:exp:{prefix}:v:{version}"


def arm_key(prefix: str, alias: str, version: str) -> str:
    return f"llmserve:exp:{prefix}:a:{alias}:{version}"


def arm_pattern(prefix: str, alias: str) -> str:
    return f"llmserve:exp:{prefix}:a:{alias}:*"


def bucket(seconds: float) -> int:
    for i, bound in enumerate(BOUNDS):
        if seconds <= bound:
            return i
    return len(BOUNDS) - 1


def observation(code: str, latency_s: float, ttft_s: float | None, prompt_tokens: int, completion_tokens: int,
                cost_micro: int, cache_hit: bool) -> dict[str, int]:
    """One request's additions to its hashes."""
    fields = {"requests": 1, "latency_count": 1, "latency_sum_us": int(latency_s * 1e6),
              f"latency_b{bucket(latency_s)}": 1}
    if code != "OK":
        fields[f"err:{code}"] = 1
        if code in SERVER_ERRORS:
            fields["server_errors"] = 1
    if ttft_s is not None:
        fields.update({"ttft_count": 1, "ttft_sum_us": int(ttft_s * 1e6), f"ttft_b{bucket(ttft_s)}": 1})
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                        ("cost_micro", cost_micro), ("cache_hits", int(cache_hit))):
        if value:
            fields[name] = value
    return fields


def quantile(q: float, counts: list[int]) -> float:
    """The q-quantile of a histogram over BOUNDS (0 when empty); the last, open bucket reports its lower bound."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lower = BOUNDS[i - 1] if i else 0.0
            upper = BOUNDS[i]
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
    return BOUNDS[-2]


def subtract(now: typing.Mapping[str, int], before: typing.Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def latency(counters: typing.Mapping[str, int], name: str) -> registry_pb2.LatencyStats:
    counts = [counters.get(f"{name}_b{i}", 0) for i in range(len(BOUNDS))]
    return registry_pb2.LatencyStats(count=counters.get(f"{name}_count", 0),
                                     sum_s=counters.get(f"{name}_sum_us", 0) / 1e6, p50_s=quantile(0.5, counts),
                                     p95_s=quantile(0.95, counts), p99_s=quantile(0.99, counts))


def arm_stats(counters: typing.Mapping[str, int], version: str, alias: str = "", weight: int = 0
              ) -> registry_pb2.ArmStats:
    return registry_pb2.ArmStats(
        version=version, alias=alias, weight=weight, requests=counters.get("requests", 0),
        errors={k[4:]: v for k, v in counters.items() if k.startswith("err:")},
        server_errors=counters.get("server_errors", 0), ttft=latency(counters, "ttft"),
        latency=latency(counters, "latency"), prompt_tokens=counters.get("prompt_tokens", 0),
        completion_tokens=counters.get("completion_tokens", 0), cost_usd=counters.get("cost_micro", 0) / 1e6,
        cache_hits=counters.get("cache_hits", 0), counters=dict(counters))


def error_rate(stats: registry_pb2.ArmStats) -> float:
    return stats.server_errors / stats.requests if stats.requests else 0.0


async def read(redis, key: str) -> dict[str, int]:
    raw = await redis.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


async def read_arms(redis, prefix: str, alias: str) -> dict[str, dict[str, int]]:
    """version -> counters of every version the alias has sent traffic to."""
    head = arm_key(prefix, alias, "")
    found: dict[str, dict[str, int]] = {}
    async for key in redis.scan_iter(match=arm_pattern(prefix, alias), count=100):
        name = key.decode() if isinstance(key, bytes) else key
        found[name[len(head):]] = await read(redis, name)
    return found
