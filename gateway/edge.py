"""The edge rules of the gateway: who calls (key -> tenant), what they may use (models, priority), how much
(rate limits and budget, reserved before a request runs and reconciled after), and what it cost (usage)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import time
import typing
import uuid

import grpc
import structlog

from llmserve.admin.v1 import keys_pb2, registry_pb2, tenants_pb2
from llmserve.common import priority as priority_class
from llmserve.common import usage
from llmserve.common.errors import ServiceError, unauthenticated
from llmserve.common.logs import get_logger
from llmserve.common.state import keys
from llmserve.common.state.views import RegistryView
from llmserve.gateway import metrics
from llmserve.gateway.journal import Journal
from llmserve.gateway.limits import RESERVATIONS_SUFFIX, Limit, Limiter, LimitExceeded, Reservation, retry_after_header

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Caller:
    key: keys_pb2.ApiKey
    tenant: tenants_pb2.Tenant


class UsageBuffer:
    """Usage goes to Redis in group commits: what requests add joins the next flush, which starts as soon as the
    one before it ended, so one pipeline carries everything that arrived meanwhile (not one round trip per
    request: the cache-hit path is dominated by round trips). add() returns a future that resolves once that
    flush is durable, confirmed by Redis or written to the journal; a request is acknowledged only then, so a
    gateway killed at any moment has lost no usage it acknowledged (seen lost before: a SIGKILL dropped up to
    half a second of it, bench/chaos.py). Each flush has an id that Redis records with the increments, so a
    flush sent again after a timeout adds nothing; a flush Redis did not confirm is replayed from the journal.
    `interval_s` is the period of the accounting loop (journal replay) that shares this buffer."""

    def __init__(self, redis_client, journal: Journal, interval_s: float = 0.5):
        self.redis = redis_client
        self.journal = journal
        self.interval_s = interval_s
        self.pending: dict[tuple[str, str, str, str], collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self._durable: asyncio.Future | None = None  # resolved once the pending rows are durable
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._flushing = asyncio.Lock()  # one flush at a time: flush() also waits for the one in progress
        journal.on("usage", self._replay)

    def add(self, tenant: str, key_id: str, version: str, counts: dict[str, int]) -> asyncio.Future:
        """Adds to the next flush; the future resolves when it is durable (await it shielded: it is shared)."""
        self.pending[(tenant, usage.today().isoformat(), key_id, version)].update(counts)
        if self._durable is None:
            self._durable = asyncio.get_running_loop().create_future()
        self._wake.set()
        return self._durable

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="usage flusher")

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def close(self) -> None:
        """Stops the flusher after the flush in progress and flushes what is left."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Returns once everything added before the call is durable, a flush in progress included."""
        async with self._flushing:
            if not self.pending:
                return
            rows, self.pending = self.pending, collections.defaultdict(collections.Counter)
            durable, self._durable = self._durable, None
            flush_id = uuid.uuid4().hex
            try:
                # Shielded: a flush interrupted by a cancellation still completes (or is journaled) in its task.
                await asyncio.shield(self._send(rows, flush_id))
            except Exception:
                pass  # journaled by _send (a journal that cannot be written is logged there)
            finally:
                if durable is not None and not durable.done():
                    durable.set_result(None)

    async def _send(self, rows, flush_id: str) -> None:
        try:
            await usage.record(self.redis, rows, flush_id)
        except Exception:
            metrics.REDIS_ERRORS.labels("usage").inc()
            try:
                self.journal.append({"op": "usage", "id": flush_id,
                                     "rows": [[*row, dict(counts)] for row, counts in rows.items()]})
            except OSError as exc:
                log.error("usage neither recorded nor journaled", error=type(exc).__name__, rows=len(rows))
            raise

    async def _replay(self, entry: dict) -> None:
        await usage.record(self.redis, {tuple(r[:4]): r[4] for r in entry["rows"]}, entry["id"])


@dataclasses.dataclass(frozen=True)
class ConcurrencyDefaults:
    """Caps for tenants and keys whose own max_concurrent_requests is 0 (gateway config); 0 here: no cap."""
    per_tenant: int = 64
    per_key: int = 0
    lease_s: float = 15.0  # an in-flight slot expires this long after its last renewal


def concurrency_cap(own: int, default: int) -> int:
    """The cap in force: a record's own value (> 0), its default (0), or none (-1), as 0 (the limiter skips it)."""
    return default if own == 0 else max(own, 0)


class Edge:
    def __init__(self, view: RegistryView, limiter: Limiter, redis_client, journal: Journal,
                 reservation_ttl_s: float = 60.0, concurrency: ConcurrencyDefaults | None = None):
        self.view, self.limiter, self.journal = view, limiter, journal
        self.usage = UsageBuffer(redis_client, journal)
        self.reservation_ttl_s = reservation_ttl_s
        self.concurrency = concurrency or ConcurrencyDefaults(lease_s=limiter.lease_ms / 1000)
        # Budget reservations and in-flight leases are renewed together, often enough for the shorter of the two.
        self.renew_every_s = min(reservation_ttl_s, limiter.lease_ms / 1000) / 3
        self.open: dict[str, Reservation] = {}  # admitted and not yet settled, by request id
        self._settling: set[asyncio.Task] = set()  # settlements (and releases) in flight
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    # ---- background: usage flushes, journal replay, reservation renewal, the reaper ----

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="accounting")
        self.usage.start()

    async def _run(self) -> None:
        renewed = reaped = time.monotonic()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(self.usage.interval_s, self.renew_every_s))
            await self.usage.flush()
            if self.journal.entries:
                await self.journal.replay()
            now = time.monotonic()
            if now - renewed >= self.renew_every_s:
                renewed = now
                await self.limiter.renew(list(self.open.values()))
            if now - reaped >= self.reservation_ttl_s:
                reaped = now
                try:
                    await self.limiter.reap()
                except Exception as exc:
                    metrics.REDIS_ERRORS.labels("limits").inc()
                    log.warning("reservation reaper failed; retrying later", error=type(exc).__name__)

    async def stop(self, settle_timeout_s: float = 2.0) -> None:
        """After the server stopped: settles what is still open (handlers cancelled by the server's stop settle
        their own; any left over is charged as reserved), flushes usage, replays the journal once, closes it."""
        deadline = time.monotonic() + settle_timeout_s
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for reservation in list(self.open.values()):
            log.warning("settling a reservation at its reserved amount at shutdown", request=reservation.request_id)
            self._track(self._settle(reservation, {}))
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=max(0.1, deadline - time.monotonic()))
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.usage.close()
        if self.journal.entries and not await self.journal.replay():
            log.warning("stopping with unconfirmed accounting operations; the next gateway on this journal "
                        "directory replays them", path=str(self.journal.path), count=len(self.journal.entries))
        self.journal.close()

    def _track(self, coro: typing.Coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle(self, reservation: Reservation, actual: dict[str, int]) -> None:
        try:
            await self.limiter.reconcile(reservation, actual)  # journaled there if Redis does not confirm
        finally:
            self.open.pop(reservation.request_id, None)

    async def _release_when_admitted(self, admission: asyncio.Future) -> None:
        """The request was cancelled while its admission ran: give back whatever it reserved."""
        try:
            reservation = await admission
        except Exception:
            return
        if reservation is not None:
            await self._settle(reservation, {lim.name: 0 for lim in reservation.limits})

    def authenticate(self, context: grpc.aio.ServicerContext) -> Caller:
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthenticated("missing API key: send metadata `authorization: Bearer <key>` "
                                  "(`llmserve keys create --tenant NAME` makes one)")
        record = self.view.api_key_record(key.strip())
        if record is None:
            raise unauthenticated("the API key is unknown")
        # Expiry is compared with the clock here, at every request: nothing in etcd changes when a key expires.
        refused = keys.refusal(record, "API key")
        if refused is not None:
            raise unauthenticated(f"{refused}; ask an admin of tenant {record.tenant!r} for a new key")
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

    def _limits(self, caller: Caller, tokens: int, cost_micro: int, sequences: int) -> list[Limit]:
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
        if sequences:
            limits += self._concurrency_limits(caller, base, sequences)
        if tenant.budget_usd > 0:
            period = usage.period_name(tenant.budget_period)
            spend = usage.spend_key(tenant.name, period)
            limits.append(Limit(f"{period}ly budget of tenant {tenant.name}", "c",
                                (spend, spend + RESERVATIONS_SUFFIX), round(tenant.budget_usd * usage.MICRO),
                                cost_micro, measure="cost", ttl_s=usage.period_seconds_left(period)))
        return limits

    def _concurrency_limits(self, caller: Caller, base: str, sequences: int) -> list[Limit]:
        """In-flight caps of the key and the tenant; a request weighs the sequences it runs (prompts x n), what
        it holds of the scheduler's queue and the workers' batches."""
        key, tenant, defaults = caller.key, caller.tenant, self.concurrency
        tenant_hint = (f"`llmserve tenants update {tenant.name} --max-concurrent N` sets "
                       f"Tenant.max_concurrent_requests" + ("" if tenant.max_concurrent_requests else
                                                            f" (0 now: gateway.max_concurrent_requests_per_tenant, "
                                                            f"{defaults.per_tenant})"))
        key_hint = ("ApiKey.max_concurrent_requests is set when a key is created (`llmserve keys create "
                    "--max-concurrent N`)" + ("" if key.max_concurrent_requests else
                                             f"; 0 on this key: gateway.max_concurrent_requests_per_key, "
                                             f"{defaults.per_key}"))
        return [
            Limit(f"concurrent sequences of key {key.key_id}", "i",
                  (f"{base}:key:{key.key_id}:inflight", f"{base}:key:{key.key_id}:inflight:sum"),
                  concurrency_cap(key.max_concurrent_requests, defaults.per_key), sequences, "sequences",
                  hint=key_hint),
            Limit(f"concurrent sequences of tenant {tenant.name}", "i", (f"{base}:inflight", f"{base}:inflight:sum"),
                  concurrency_cap(tenant.max_concurrent_requests, defaults.per_tenant), sequences, "sequences",
                  hint=tenant_hint),
        ]

    async def admit(self, caller: Caller, request_id: str, version: registry_pb2.ModelVersion,
                    prompt_tokens: int, max_completion_tokens: int, sequences: int = 0) -> Reservation | None:
        """Reserves requests, prompt + max completion tokens, their highest cost and `sequences` in-flight
        slots (0: none, for a request that holds nothing, a cache hit), or raises RESOURCE_EXHAUSTED with a
        retry-after. None: Redis failed and the policy is fail open (never for a tenant with a budget: budgets
        fail closed). A reservation returned is settled by settle(), whatever happens; that frees its slots."""
        tokens = prompt_tokens + max_completion_tokens
        cost = usage.cost_micro_usd(prompt_tokens, max_completion_tokens, version.price_per_1k_prompt_tokens,
                                    version.price_per_1k_completion_tokens)
        limits = self._limits(caller, tokens, cost, sequences)
        scope = f"llmserve:rl:{{{caller.tenant.name}}}"
        if not any(lim.limit > 0 for lim in limits):  # nothing to check or reserve: no task, no Redis
            unlimited = Reservation(request_id, [], scope)
            unlimited.settled = True
            return unlimited
        # Shielded: a cancellation while the script runs lets it finish, then gives back what it reserved.
        admission = asyncio.ensure_future(
            self.limiter.admit(request_id, limits, scope))
        try:
            reservation = await asyncio.shield(admission)
        except asyncio.CancelledError:
            self._track(self._release_when_admitted(admission))
            raise
        except LimitExceeded as exc:
            metrics.LIMITED.labels(exc.limit.measure).inc()
            if exc.limit.kind == "i":
                raise self._over_concurrency(exc) from None
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
            if any(lim.kind == "c" and lim.limit > 0 for lim in limits):
                raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                   f"the budget of tenant {caller.tenant.name!r} cannot be checked (Redis is "
                                   "unavailable) and budgets fail closed; retry") from None
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               "the rate limiter is unavailable (Redis) and the policy is to fail closed; retry"
                               ) from None
        if reservation is not None:
            if any(lim.amount > 0 and lim.measure != "requests" for lim in reservation.limits):
                self.open[request_id] = reservation
            else:  # only request counts (a cache hit): nothing to reconcile, nothing that could leak
                reservation.settled = True
        return reservation

    @staticmethod
    def _over_concurrency(exc: LimitExceeded) -> ServiceError:
        lim = exc.limit
        if exc.retry_after_s is None:
            return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this request runs {lim.amount} sequences (prompts x n) and the cap on {lim.name} "
                                f"is {lim.limit}: lower n or the number of prompts, or raise the cap ({lim.hint})",
                                trailers=(("x-should-retry", "false"),))
        retry = retry_after_header(exc.retry_after_s)
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"concurrency cap reached: {exc.used} {lim.name} are running and the cap is {lim.limit} "
                            f"(this request needs {lim.amount}); retry when one ends (after {retry} s), or raise the "
                            f"cap ({lim.hint})",
                            trailers=(("retry-after", retry),))

    @staticmethod
    def cost(version: registry_pb2.ModelVersion, prompt_tokens: int, completion_tokens: int) -> int:
        """The real cost in micro-USD."""
        return usage.cost_micro_usd(prompt_tokens, completion_tokens, version.price_per_1k_prompt_tokens,
                                    version.price_per_1k_completion_tokens)

    async def settle(self, reservation: Reservation | None, version: registry_pb2.ModelVersion,
                     prompt_tokens: int, completion_tokens: int) -> int:
        """Reconciles the reservation to what was computed; returns the real cost in micro-USD. The settlement
        runs in its own task: a cancellation of the caller does not stop it, and stop() waits for it."""
        cost = self.cost(version, prompt_tokens, completion_tokens)
        if reservation is not None and reservation.limits and not reservation.settled:
            amounts = {"tokens": prompt_tokens + completion_tokens, "cost": cost}
            await asyncio.shield(self._track(self._settle(reservation, {
                lim.name: amounts[lim.measure] for lim in reservation.limits if lim.measure in amounts})))
        return cost

    def record(self, caller: Caller, version: str, *, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int, cache_hit: bool, cost_micro: int) -> asyncio.Future:
        """Counts the request's usage; the future resolves once it is durable (see UsageBuffer)."""
        if prompt_tokens:
            metrics.child(metrics.TOKENS, version, "prompt").inc(prompt_tokens)
        if completion_tokens:
            metrics.child(metrics.TOKENS, version, "completion").inc(completion_tokens)
        if cost_micro:
            metrics.child(metrics.COST, version).inc(cost_micro / usage.MICRO)
        return self.usage.add(caller.tenant.name, caller.key.key_id, version, {
            "requests": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens, "cache_hits": int(cache_hit), "cost_micro_usd": cost_micro})
