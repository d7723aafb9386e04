"""Prometheus metrics of the worker."""

from prometheus_client import Counter, Gauge

PROMPT_TOKENS = Counter("llmserve_worker_prompt_tokens", "Prompt tokens processed", ["model_version"])
COMPLETION_TOKENS = Counter("llmserve_worker_completion_tokens", "Tokens generated", ["model_version"])
RUNNING = Gauge("llmserve_worker_running_sequences", "Sequences being computed", ["model_version"])
WAITING = Gauge("llmserve_worker_waiting_sequences", "Sequences waiting for a batch slot", ["model_version"])
