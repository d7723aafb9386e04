"""Prometheus metrics of the gateway."""

import functools

from prometheus_client import Counter, Histogram


@functools.lru_cache(maxsize=4096)
def child(metric, *labels: str):
    """metric.labels(*labels), looked up once: labels() costs microseconds, several times per request."""
    return metric.labels(*labels)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)

REQUESTS = Counter("llmserve_gateway_requests", "Requests by method and status code", ["method", "code"])
LATENCY = Histogram("llmserve_gateway_request_seconds", "End-to-end request latency", ["method"],
                    buckets=LATENCY_BUCKETS)
TTFT = Histogram("llmserve_gateway_time_to_first_token_seconds", "Time to first token of streamed requests",
                 ["model_version"], buckets=LATENCY_BUCKETS)
INTER_TOKEN = Histogram("llmserve_gateway_inter_token_seconds", "Time between a sequence's text deltas",
                        ["model_version"], buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
TOKENS = Counter("llmserve_gateway_tokens", "Tokens by model version and direction (prompt, completion)",
                 ["model_version", "direction"])
CACHE = Counter("llmserve_gateway_response_cache", "Response cache lookups by result (hit, miss, bypass)",
                ["result"])
REDIS_ERRORS = Counter("llmserve_gateway_redis_errors", "Redis operations that failed (served anyway)", ["op"])
LIMITED = Counter("llmserve_gateway_limited_requests", "Requests refused by a limit, by what was exceeded",
                  ["measure"])
COST = Counter("llmserve_gateway_cost_usd", "Cost of served requests from the registry's prices", ["model_version"])
# A/B arms: what each alias sent to each version (gateway/experiments.py; Redis holds the sums over replicas).
ARM_REQUESTS = Counter("llmserve_gateway_arm_requests", "Requests an alias sent to a version, by status code",
                       ["alias", "model_version", "code"])
ARM_LATENCY = Histogram("llmserve_gateway_arm_request_seconds", "End-to-end latency per alias arm",
                        ["alias", "model_version"], buckets=LATENCY_BUCKETS)
ARM_TTFT = Histogram("llmserve_gateway_arm_time_to_first_token_seconds", "Time to first token per alias arm",
                     ["alias", "model_version"], buckets=LATENCY_BUCKETS)
ARM_CACHE_HITS = Counter("llmserve_gateway_arm_cache_hits", "Response-cache hits per alias arm",
                         ["alias", "model_version"])
# Tasks whose scheduler failed them (gateway/scheduler_client.py): restarted on another (nothing had been sent),
# resumed there from the tokens sent, or refused (cannot move: n > 1, no token ids, too many moves).
SCHEDULER_FAILOVERS = Counter("llmserve_gateway_scheduler_failovers", "Tasks moved off a failed scheduler, by outcome",
                              ["outcome"])
