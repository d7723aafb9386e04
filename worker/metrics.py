"""Prometheus metrics of the worker."""

from prometheus_client import Counter, Gauge

PROMPT_TOKENS = Counter("llmserve_worker_prompt_tokens", "Prompt tokens processed", ["model_version"])
COMPLETION_TOKENS = Counter("llmserve_worker_completion_tokens", "Tokens generated", ["model_version"])
RUNNING = Gauge("llmserve_worker_running_sequences", "Sequences being computed", ["model_version"])
WAITING = Gauge("llmserve_worker_waiting_sequences", "Sequences waiting for a batch slot", ["model_version"])
KV_BLOCKS = Gauge("llmserve_worker_kv_cache_blocks", "KV-cache blocks by state (used, free, cached = free but "
                  "holding a reusable prefix)", ["model_version", "state"])
PREFIX_HIT_TOKENS = Gauge("llmserve_worker_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache "
                          "since start", ["model_version"])
PREEMPTIONS = Gauge("llmserve_worker_preemptions", "Sequences preempted for KV room since start", ["model_version"])
