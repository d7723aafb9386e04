"""Canary rollouts with automatic rollback: the RPCs that start and steer them, and the controller that moves them.

A rollout moves an alias from its stable version to a target in steps of canary weight (5 -> 25 -> 50 -> 100 %).
Each step is judged on the canary's own traffic over that step (the difference of the arms' cumulative counters
since the step began, common/experiments.py), once it has min_requests:
  - an SLO breached (server-error rate, p95 TTFT or latency, absolute or relative to the stable arm over the
    same step) rolls back at once: the alias routes 100 % to stable again;
  - healthy and interval_s passed: the next step; healthy after the last (100 %) step: promoted.
A step without enough canary requests waits (one "wait" event per step says so). Every decision is a
RolloutEvent with the figures it was taken on, and a metric.

The controller runs in the registry process; of several replicas only the one holding the etcd lease on
`registry/controller` acts, and each of its writes (alias, rollout, event in one transaction) is fenced by that
key still naming it, so a replica that lost leadership without knowing it cannot write.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

from prometheus_client import Counter, Gauge

from llmserve.admin.v1 import registry_pb2
from llmserve.common import experiments
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state.codec import encode
from llmserve.common.state.store import Store

log = get_logger(__name__)

R = registry_pb2.RolloutState
DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_INTERVAL_S = 60.0
DEFAULT_MIN_REQUESTS = 20
DEFAULT_MAX_ERROR_RATE = 0.05
MAX_EVENTS = 500

DECISIONS = Counter("llmserve_rollout_decisions", "Rollout controller decisions", ["alias", "decision"])
CANARY_PERCENT = Gauge("llmserve_rollout_canary_percent", "Canary weight of an alias's rollout", ["alias"])
CANARY_ERROR_RATE = Gauge("llmserve_rollout_canary_error_rate", "Canary server-error rate over the current step",
                          ["alias"])
CANARY_P95 = Gauge("llmserve_rollout_canary_p95_latency_seconds", "Canary p95 latency over the current step",
                   ["alias"])
LEADER = Gauge("llmserve_rollout_controller_leader", "1 while this registry replica leads the rollout controller")


def percent(rollout: registry_pb2.Rollout) -> int:
    return rollout.policy.steps[rollout.step] if rollout.state == R.ROLLOUT_STATE_PROGRESSING or \
        rollout.state == R.ROLLOUT_STATE_PAUSED else 100 if rollout.state == R.ROLLOUT_STATE_PROMOTED else 0


def split(alias: str, stable: str, target: str, canary_percent: int) -> registry_pb2.Alias:
    targets = []
    if canary_percent < 100:
        targets.append(registry_pb2.TrafficSplit(version=stable, weight=100 - canary_percent))
    if canary_percent > 0:
        targets.append(registry_pb2.TrafficSplit(version=target, weight=canary_percent))
    return registry_pb2.Alias(name=alias, targets=targets, updated=int(time.time()))


def breaches(canary: registry_pb2.ArmStats, stable: registry_pb2.ArmStats, policy: registry_pb2.RolloutPolicy
             ) -> list[str]:
    """The SLOs the canary's step figures break, in words with the figures (empty: healthy)."""
    slo, found = policy.slo, []
    rate = experiments.error_rate(canary)
    if rate > slo.max_error_rate:
        found.append(f"server-error rate {rate:.1%} ({canary.server_errors} of {canary.requests}) > "
                     f"{slo.max_error_rate:.1%}")
    if slo.max_p95_ttft_s and canary.ttft.count and canary.ttft.p95_s > slo.max_p95_ttft_s:
        found.append(f"p95 TTFT {canary.ttft.p95_s * 1000:.0f} ms > {slo.max_p95_ttft_s * 1000:.0f} ms")
    if slo.max_p95_latency_s and canary.latency.p95_s > slo.max_p95_latency_s:
        found.append(f"p95 latency {canary.latency.p95_s * 1000:.0f} ms > {slo.max_p95_latency_s * 1000:.0f} ms")
    if stable.requests >= policy.min_requests:  # relative SLOs only against a stable arm with figures of its own
        for name, ratio, c, s in (("latency", slo.max_p95_latency_ratio, canary.latency, stable.latency),
                                  ("TTFT", slo.max_p95_ttft_ratio, canary.ttft, stable.ttft)):
            if ratio and c.count and s.count and s.p95_s > 0 and c.p95_s > ratio * s.p95_s:
                found.append(f"p95 {name} {c.p95_s * 1000:.0f} ms > {ratio:g} x stable's {s.p95_s * 1000:.0f} ms")
    return found


def summary(stats: registry_pb2.ArmStats) -> str:
    return (f"{stats.requests} requests, {experiments.error_rate(stats):.1%} server errors, p95 latency "
            f"{stats.latency.p95_s * 1000:.0f} ms, p95 TTFT {stats.ttft.p95_s * 1000:.0f} ms")


class Controller:
    """Evaluates every progressing rollout each tick while it holds the leader lease."""

    def __init__(self, store: Store, redis, prefix: str, tick_s: float = 1.0, lease_ttl_s: int = 5):
        self.store, self.redis, self.prefix = store, redis, prefix
        self.tick_s, self.lease_ttl_s = tick_s, lease_ttl_s
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.is_leader = False
        self._key = store.paths.controller.encode()
        self._lease = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout controller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._lease is not None and self.is_leader:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)  # the next replica takes over at once
            except Exception:
                pass
        self.is_leader = False
        LEADER.set(0)

    async def _campaign(self) -> bool:
        client = self.store.client
        if self._lease is None:
            self._lease = await client.lease(self.lease_ttl_s)
        else:
            reply = await self._lease.refresh()
            if not reply or reply.TTL <= 0:
                self._lease = await client.lease(self.lease_ttl_s)
        txn = client.transactions
        won, _ = await client.transaction(compare=[txn.version(self._key) == 0],
                                          success=[txn.put(self._key, self.identity.encode(), lease=self._lease)],
                                          failure=[])
        if won:
            return True
        kv = await client.get(self._key)
        return kv is not None and kv.value == self.identity.encode()

    async def _run(self) -> None:
        last_refresh = 0.0
        while True:
            try:
                if time.monotonic() - last_refresh >= min(self.tick_s, self.lease_ttl_s / 3):
                    leader = await self._campaign()
                    last_refresh = time.monotonic()
                    if leader != self.is_leader:
                        log.info("rollout controller leadership", leader=leader, identity=self.identity)
                    self.is_leader = leader
                    LEADER.set(int(leader))
                if self.is_leader:
                    for rollout in await self.store.rollouts.list():
                        if rollout.state == R.ROLLOUT_STATE_PROGRESSING:
                            await self.evaluate(rollout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd or Redis away: keep the alias as it is, try again next tick
                log.warning("rollout controller tick failed", error=f"{type(exc).__name__}: {exc}")
                self.is_leader = False
                LEADER.set(0)
            await asyncio.sleep(self.tick_s)

    async def _arms(self, rollout: registry_pb2.Rollout) -> tuple[dict, dict]:
        alias, p = rollout.policy.alias, self.prefix
        canary = await experiments.read(self.redis, experiments.arm_key(p, alias, rollout.policy.target_version))
        stable = await experiments.read(self.redis, experiments.arm_key(p, alias, rollout.stable_version))
        return canary, stable

    async def evaluate(self, rollout: registry_pb2.Rollout) -> None:
        policy, now = rollout.policy, time.time()
        canary_raw, stable_raw = await self._arms(rollout)
        canary = experiments.arm_stats(experiments.subtract(canary_raw, rollout.canary_baseline.counters),
                                       policy.target_version, policy.alias)
        stable = experiments.arm_stats(experiments.subtract(stable_raw, rollout.stable_baseline.counters),
                                       rollout.stable_version, policy.alias)
        CANARY_ERROR_RATE.labels(policy.alias).set(experiments.error_rate(canary))
        CANARY_P95.labels(policy.alias).set(canary.latency.p95_s)
        elapsed = now - rollout.step_started
        if canary.requests < policy.min_requests:
            if elapsed >= policy.interval_s and not rollout.reason.startswith("waiting"):
                rollout.reason = (f"waiting: the canary served {canary.requests} of the {policy.min_requests} "
                                  f"requests step {rollout.step + 1} needs")
                await self.commit(rollout, None, "wait", rollout.reason, canary, stable)
            return
        found = breaches(canary, stable, policy)
        if found:
            rollout.state = R.ROLLOUT_STATE_ROLLED_BACK
            rollout.reason = "SLO breached at {}%: {}".format(policy.steps[rollout.step], "; ".join(found))
            await self.commit(rollout, split(policy.alias, rollout.stable_version, policy.target_version, 0),
                              "rollback", f"{rollout.reason} (canary: {summary(canary)}; stable: {summary(stable)})",
                              canary, stable)
            return
        if elapsed < policy.interval_s:
            return
        healthy = f"healthy over {elapsed:.1f} s (canary: {summary(canary)}; stable: {summary(stable)})"
        if rollout.step + 1 >= len(policy.steps):
            rollout.state = R.ROLLOUT_STATE_PROMOTED
            rollout.reason = f"promoted: {policy.target_version} serves 100%"
            await self.commit(rollout, None, "promote", healthy, canary, stable)
            return
        rollout.step += 1
        self.new_step(rollout, canary_raw, stable_raw, now)
        await self.commit(rollout, split(policy.alias, rollout.stable_version, policy.target_version,
                                         policy.steps[rollout.step]), "advance", healthy, canary, stable)

    @staticmethod
    def new_step(rollout: registry_pb2.Rollout, canary_raw: dict, stable_raw: dict, now: float) -> None:
        rollout.step_started = now
        rollout.reason = ""
        rollout.canary_baseline.CopyFrom(experiments.arm_stats(canary_raw, rollout.policy.target_version))
        rollout.stable_baseline.CopyFrom(experiments.arm_stats(stable_raw, rollout.stable_version))

    async def commit(self, rollout, alias, decision, reason, canary, stable) -> bool:
        """Writes the rollout, the alias (when it changes) and the event in one transaction, fenced by the leader
        key; False (nothing written) when this replica no longer leads."""
        event = registry_pb2.RolloutEvent(alias=rollout.policy.alias, time=time.time(), decision=decision,
                                          canary_percent=percent(rollout), reason=reason, canary=canary,
                                          stable=stable, controller=self.identity)
        ok = await write(self.store, rollout, alias, event, fence=(self._key, self.identity.encode()))
        if ok:
            record_metrics(rollout, decision)
            log.info("rollout decision", alias=rollout.policy.alias, decision=decision, reason=reason)
        else:
            self.is_leader = False
        return ok


def record_metrics(rollout: registry_pb2.Rollout, decision: str) -> None:
    DECISIONS.labels(rollout.policy.alias, decision).inc()
    CANARY_PERCENT.labels(rollout.policy.alias).set(percent(rollout))


async def write(store: Store, rollout: registry_pb2.Rollout, alias: registry_pb2.Alias | None,
                event: registry_pb2.RolloutEvent, fence: tuple[bytes, bytes] | None = None) -> bool:
    client, txn = store.client, store.client.transactions
    puts = [txn.put(store.rollouts._key(rollout.policy.alias), encode(rollout)),
            txn.put(store.rollout_events._key(store.rollout_events.name(event)), encode(event))]
    if alias is not None:
        puts.append(txn.put(store.aliases._key(alias.name), encode(alias)))
    compare = [txn.value(fence[0]) == fence[1]] if fence else []
    ok, _ = await client.transaction(compare=compare, success=puts, failure=[])
    return ok


class RolloutRpcs:
    """Mixed into RegistryServicer (store, redis, prefix, registry config, check_routable)."""

    store: Store
    redis: object
    prefix: str

    async def _rollout(self, alias: str) -> registry_pb2.Rollout:
        found = await self.store.rollouts.get(alias)
        if found is None:
            raise not_found(f"alias {alias!r} has no rollout; StartRollout starts one")
        return found

    async def StartRollout(self, request, context):
        policy = registry_pb2.RolloutPolicy.FromString(request.policy.SerializeToString())
        alias = await self.store.aliases.get(policy.alias)
        if alias is None:
            raise not_found(f"policy.alias={policy.alias!r} does not exist; SetAlias creates it")
        target = await self.store.versions.get(policy.target_version)
        if target is None:
            raise invalid_argument(f"policy.target_version={policy.target_version!r} is not registered")
        others = [t for t in alias.targets if t.version != policy.target_version]
        if not others:
            raise invalid_argument(f"alias {policy.alias!r} routes only to {policy.target_version!r} already; "
                                   "nothing to roll out")
        stable = max(others, key=lambda t: t.weight).version
        stable_version = await self.store.versions.get(stable)
        if stable_version is not None and stable_version.kind != target.kind:
            raise invalid_argument("policy.target_version is of another kind than the alias's versions")
        await self.check_routable(policy.target_version, "policy.target_version")
        steps = list(policy.steps) or list(DEFAULT_STEPS)
        if any(not 1 <= s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise invalid_argument(f"policy.steps={steps} must be increasing percentages in 1..100 ending at 100")
        policy.ClearField("steps")
        policy.steps.extend(steps)
        if policy.interval_s < 0 or policy.interval_s != policy.interval_s:
            raise invalid_argument(f"policy.interval_s={policy.interval_s} must be >= 0 (0: 60 s)")
        policy.interval_s = policy.interval_s or DEFAULT_INTERVAL_S
        policy.min_requests = policy.min_requests or DEFAULT_MIN_REQUESTS
        slo = policy.slo
        if not 0 <= slo.max_error_rate <= 1:
            raise invalid_argument(f"policy.slo.max_error_rate={slo.max_error_rate} must be in [0, 1]")
        slo.max_error_rate = slo.max_error_rate or DEFAULT_MAX_ERROR_RATE
        for name in ("max_p95_ttft_s", "max_p95_latency_s", "max_p95_latency_ratio", "max_p95_ttft_ratio"):
            if not getattr(slo, name) >= 0:
                raise invalid_argument(f"policy.slo.{name}={getattr(slo, name)} must be >= 0 (0: not checked)")
        existing = await self.store.rollouts.get(policy.alias)
        if existing is not None and existing.state in (R.ROLLOUT_STATE_PROGRESSING, R.ROLLOUT_STATE_PAUSED):
            raise failed_precondition(f"alias {policy.alias!r} has a rollout of {existing.policy.target_version!r} "
                                      "in progress; abort it first (ControlRollout ABORT)")
        now = time.time()
        rollout = registry_pb2.Rollout(policy=policy, stable_version=stable, state=R.ROLLOUT_STATE_PROGRESSING,
                                       step=0, started=now)
        canary_raw = await experiments.read(self.redis, experiments.arm_key(self.prefix, policy.alias,
                                                                            policy.target_version))
        stable_raw = await experiments.read(self.redis, experiments.arm_key(self.prefix, policy.alias, stable))
        Controller.new_step(rollout, canary_raw, stable_raw, now)
        reason = (f"{policy.target_version} at {steps[0]}% beside {stable}; steps {steps}, "
                  f"{policy.interval_s:g} s each, judged on {policy.min_requests}+ canary requests")
        await self._write(rollout, split(policy.alias, stable, policy.target_version, steps[0]), "start", reason)
        return registry_pb2.StartRolloutResponse(rollout=rollout)

    async def _write(self, rollout, alias, decision: str, reason: str) -> None:
        event = registry_pb2.RolloutEvent(alias=rollout.policy.alias, time=time.time(), decision=decision,
                                          canary_percent=percent(rollout), reason=reason, controller="admin")
        await write(self.store, rollout, alias, event)
        record_metrics(rollout, decision)
        log.info("rollout decision", alias=rollout.policy.alias, decision=decision, reason=reason)

    async def GetRollout(self, request, context):
        return registry_pb2.GetRolloutResponse(rollout=await self._rollout(request.alias))

    async def ControlRollout(self, request, context):
        rollout = await self._rollout(request.alias)
        action, p = request.action, rollout.policy
        live = (R.ROLLOUT_STATE_PROGRESSING, R.ROLLOUT_STATE_PAUSED)
        if action == registry_pb2.ROLLOUT_ACTION_UNSPECIFIED:
            raise invalid_argument("action is required: ROLLOUT_ACTION_PAUSE, _RESUME or _ABORT")
        if rollout.state not in live:
            raise failed_precondition(f"the rollout of {p.alias!r} is {R.Name(rollout.state)} already")
        alias = None
        if action == registry_pb2.ROLLOUT_ACTION_PAUSE:
            rollout.state, rollout.reason, decision = R.ROLLOUT_STATE_PAUSED, "paused by an operator", "pause"
        elif action == registry_pb2.ROLLOUT_ACTION_RESUME:
            if rollout.state != R.ROLLOUT_STATE_PAUSED:
                raise failed_precondition(f"the rollout of {p.alias!r} is not paused")
            canary_raw = await experiments.read(self.redis, experiments.arm_key(self.prefix, p.alias,
                                                                                p.target_version))
            stable_raw = await experiments.read(self.redis, experiments.arm_key(self.prefix, p.alias,
                                                                                rollout.stable_version))
            rollout.state = R.ROLLOUT_STATE_PROGRESSING
            Controller.new_step(rollout, canary_raw, stable_raw, time.time())
            decision = "resume"
        else:
            rollout.state, rollout.reason, decision = R.ROLLOUT_STATE_ROLLED_BACK, "aborted by an operator", "abort"
            alias = split(p.alias, rollout.stable_version, p.target_version, 0)
        await self._write(rollout, alias, decision, rollout.reason or "resumed by an operator")
        return registry_pb2.ControlRolloutResponse(rollout=rollout)

    async def ListRolloutEvents(self, request, context):
        if not request.alias:
            raise invalid_argument("alias is required")
        events = await self.store.rollout_events.under(request.alias).list()
        return registry_pb2.ListRolloutEventsResponse(events=events[-MAX_EVENTS:])
