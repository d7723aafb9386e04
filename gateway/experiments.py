"""Per-version and per-arm A/B statistics of the requests this gateway served: Prometheus labels at once, and the
counters of common/experiments.py added to Redis in batches (one pipeline every flush_s with what arrived
meanwhile), where every replica's additions sum. Statistics are disposable: a failed flush is logged and dropped,
never in a request's way."""

from __future__ import annotations

import asyncio
import collections
import typing

from llmserve.common import experiments, usage
from llmserve.common.logs import get_logger
from llmserve.gateway import metrics

if typing.TYPE_CHECKING:
    from llmserve.gateway.context import RequestContext

log = get_logger(__name__)


class ExperimentStats:
    def __init__(self, redis_client, prefix: str, flush_s: float = 0.25):
        self.redis, self.prefix, self.flush_s = redis_client, prefix, flush_s
        self.pending: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="experiment stats flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()

    def record(self, ctx: RequestContext, code: str, elapsed_s: float) -> None:
        """A finished request of a resolved model (called by gateway/context.observe)."""
        version = ctx.version
        if version is None:
            return
        prompt, completion = ctx.prompt_tokens or 0, ctx.completion_tokens or 0
        hit = ctx.cache == "hit"
        cost = 0 if hit else usage.cost_micro_usd(prompt, completion, version.price_per_1k_prompt_tokens,
                                                  version.price_per_1k_completion_tokens)
        fields = experiments.observation(code, elapsed_s, ctx.first_token_s, prompt, completion, cost, hit)
        self.pending[experiments.version_key(self.prefix, version.version)].update(fields)
        if ctx.alias:
            self.pending[experiments.arm_key(self.prefix, ctx.alias, version.version)].update(fields)
            labels = (ctx.alias, version.version)
            metrics.child(metrics.ARM_REQUESTS, *labels, code).inc()
            metrics.child(metrics.ARM_LATENCY, *labels).observe(elapsed_s)
            if ctx.first_token_s is not None:
                metrics.child(metrics.ARM_TTFT, *labels).observe(ctx.first_token_s)
            if hit:
                metrics.child(metrics.ARM_CACHE_HITS, *labels).inc()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, collections.defaultdict(collections.Counter)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, fields in pending.items():
                for field, value in fields.items():
                    pipe.hincrby(key, field, value)
            await pipe.execute()
        except Exception as exc:
            metrics.child(metrics.REDIS_ERRORS, "experiment_stats").inc()
            log.warning("experiment statistics not stored", error=type(exc).__name__, num_keys=len(pending))
