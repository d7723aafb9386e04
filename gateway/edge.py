"""The edge rules of the gateway: who calls (key -> tenant), what they may use (models, priority), how much
(rate limits and budget, reserved before a request runs and reconciled after), and what it cost (usage)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fnmatch

import grpc
import structlog

from llmserve.admin.v1 import keys_pb2, registry_pb2, tenants_pb2
from llmserve.common import priority as priority_class
from llmserve.common import usage
from llmserve.common.errors import ServiceError, unauthenticated
from llmserve.common.state.views import RegistryView
from llmserve.gateway import metrics
from llmserve.gateway.limits import Limit, Limiter, LimitExceeded, Reservation, retry_after_header


@dataclasses.dataclass(frozen=True)
class Caller:
    key: keys_pb2.ApiKey
    tenant: tenants_pb2.Tenant


class UsageBuffer:
    """Sums usage in memory and writes it to Redis in one pipeline every `interval_s` (not one round trip per
    request: the cache-hit path is dominated by round trips). Each request is counted exactly once; a crash can
    lose at most one interval, and stop() flushes."""

    def __init__(self, redis_client, interval_s: float = 0.5):
        self.redis = redis_client
        self.interval_s = interval_s
        self.pending: dict[tuple[str, str, str, str], collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self._task: asyncio.Task | None = None

    def add(self, tenant: str, key_id: str, version: str, counts: dict[str, int]) -> None:
        self.pending[(tenant, usage.today().isoformat(), key_id, version)].update(counts)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, collections.defaultdict(collections.Counter)
        try:
            await usage.record(self.redis, rows)
        except Exception:
            metrics.REDIS_ERRORS.labels("usage").inc()
            for row, counts in rows.items():
                self.pending[row].update(counts)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.flush()


class Edge:
    def __init__(self, view: RegistryView, limiter: Limiter, redis_client):
        self.view, self.limiter = view, limiter
        self.usage = UsageBuffer(redis_client)

    def authenticate(self, context: grpc.aio.ServicerContext) -> Caller:
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthenticated("missing API key: send metadata `authorization: Bearer <key>` "
                                  "(`llmserve keys create --tenant NAME` makes one)")
        record = self.view.api_key(key.strip())
        if record is None:
            raise unauthenticated("the API key is unknown or revoked")
        tenant = self.view.tenant(record.tenant)
        if tenant is None:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"tenant {record.tenant!r} of this API key does not exist any more")
        structlog.contextvars.bind_contextvars(tenant=tenant.name, key_id=record.key_id)
        return Caller(record, tenant)

    @staticmethod
    def may_use(tenant: tenants_pb2.Tenant, *names: str) -> bool:
        patterns = list(tenant.allowed_models)
        return not patterns or any(fnmatch.fnmatchcase(n, p) for n in names if n for p in patterns)

    def authorize_model(self, caller: Caller, requested: str, version: registry_pb2.ModelVersion) -> None:
        if not self.may_use(caller.tenant, requested, version.version):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"tenant {caller.tenant.name!r} may not use model {requested!r}; allowed: "
                               f"{', '.join(caller.tenant.allowed_models)}")

    @staticmethod
    def cap_priority(caller: Caller, priority: int) -> tuple[int, str]:
        """Returns (priority to use, note for the response metadata: "" when unchanged)."""
        cap = caller.tenant.max_priority
        if cap and priority < cap:  # lower number = higher class
            return cap, f"{priority_class.name(cap)} (capped from {priority_class.name(priority)})"
        return priority, ""

    @staticmethod
    def counts_tokens(caller: Caller) -> bool:
        """Whether admission needs the prompt's token count (a token limit or a budget applies)."""
        return bool(caller.key.tokens_per_minute or caller.tenant.tokens_per_minute or caller.tenant.budget_usd > 0)

    def _limits(self, caller: Caller, tokens: int, cost_micro: int) -> list[Limit]:
        key, tenant = caller.key, caller.tenant
        # One hash tag per tenant keeps every key of one admission in one Redis Cluster slot.
        base = f"llmserve:rl:{{{tenant.name}}}"
        window = [
            (f"requests per minute of key {key.key_id}", f"{base}:key:{key.key_id}:req", key.requests_per_minute,
             1, "requests"),
            (f"tokens per minute of key {key.key_id}", f"{base}:key:{key.key_id}:tok", key.tokens_per_minute,
             tokens, "tokens"),
            (f"requests per minute of tenant {tenant.name}", f"{base}:req", tenant.requests_per_minute, 1, "requests"),
            (f"tokens per minute of tenant {tenant.name}", f"{base}:tok", tenant.tokens_per_minute, tokens, "tokens"),
        ]
        limits = [Limit(name, "w", (k, k + ":sum"), limit, amount, measure)
                  for name, k, limit, amount, measure in window]
        if tenant.budget_usd > 0:
            period = usage.period_name(tenant.budget_period)
            limits.append(Limit(f"{period}ly budget of tenant {tenant.name}", "c",
                                (usage.spend_key(tenant.name, period),), round(tenant.budget_usd * usage.MICRO),
                                cost_micro, measure="cost", ttl_s=usage.period_seconds_left(period)))
        return limits

    async def admit(self, caller: Caller, request_id: str, version: registry_pb2.ModelVersion,
                    prompt_tokens: int, max_completion_tokens: int) -> Reservation | None:
        """Reserves requests, prompt + max completion tokens and their highest cost, or raises
        RESOURCE_EXHAUSTED with a retry-after. None: Redis failed and the policy is fail open."""
        tokens = prompt_tokens + max_completion_tokens
        cost = usage.cost_micro_usd(prompt_tokens, max_completion_tokens, version.price_per_1k_prompt_tokens,
                                    version.price_per_1k_completion_tokens)
        try:
            reservation = await self.limiter.admit(request_id, self._limits(caller, tokens, cost))
        except LimitExceeded as exc:
            metrics.LIMITED.labels(exc.limit.measure).inc()
            if exc.retry_after_s is None:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"this request needs {exc.limit.amount} of the {exc.limit.name} "
                                   f"({exc.limit.limit}); lower max_tokens or split the request",
                                   trailers=(("x-should-retry", "false"),)) from None
            what = "budget" if exc.limit.kind == "c" else "rate limit"
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{what} exceeded: {exc.limit.name} is {exc.limit.limit}"
                               + (" micro-USD" if exc.limit.kind == "c" else "")
                               + f"; retry after {retry_after_header(exc.retry_after_s)} s",
                               trailers=(("retry-after", retry_after_header(exc.retry_after_s)),)) from None
        except ServiceError:
            raise
        except Exception:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               "the rate limiter is unavailable (Redis) and the policy is to fail closed; retry"
                               ) from None
        return reservation

    async def settle(self, reservation: Reservation | None, version: registry_pb2.ModelVersion,
                     prompt_tokens: int, completion_tokens: int) -> int:
        """Reconciles the reservation to what was computed; returns the real cost in micro-USD."""
        cost = usage.cost_micro_usd(prompt_tokens, completion_tokens, version.price_per_1k_prompt_tokens,
                                    version.price_per_1k_completion_tokens)
        amounts = {"tokens": prompt_tokens + completion_tokens, "cost": cost}
        if reservation is not None:
            await self.limiter.reconcile(reservation, {
                lim.name: amounts[lim.measure] for lim in reservation.limits if lim.measure in amounts})
        return cost

    def record(self, caller: Caller, version: str, *, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int, cache_hit: bool, cost_micro: int) -> None:
        metrics.TOKENS.labels(version, "prompt").inc(prompt_tokens)
        metrics.TOKENS.labels(version, "completion").inc(completion_tokens)
        metrics.COST.labels(version).inc(cost_micro / usage.MICRO)
        self.usage.add(caller.tenant.name, caller.key.key_id, version, {
            "requests": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens, "cache_hits": int(cache_hit), "cost_micro_usd": cost_micro})
