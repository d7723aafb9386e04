"""Canary rollouts through the whole mesh, with short intervals: a canary whose version injects a 50% error rate
is rolled back to 100% stable within a stated time and costs a bounded number of client errors; a healthy canary
is promoted through every step; only one controller replica leads; fault injection is refused in production."""

from __future__ import annotations

import asyncio
import copy
import time

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.clients.admin import registry_stub
from llmserve.common import tls
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.registry.app import RegistryApp
from llmserve.registry.rollout import Controller
from tests.helpers.mesh import generate_version, start_mesh

PROMPT = "The quick brown fox jumps over the lazy dog and then"
MIN_REQUESTS = 10
# Stated bounds of the rollback: decided within ROLLBACK_S of the start, costing at most MAX_ERRORS failed client
# requests (at 50% errors, about half of the MIN_REQUESTS canary requests it is judged on, plus those that ran
# while the decision took a controller tick and a statistics flush).
ROLLBACK_S = 20.0  # on 2 loaded cores the 10 canary requests take 1-6 s to arrive
MAX_ERRORS = 20


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    config = make_config()
    config.worker.num_kv_blocks = 64
    # A model load holds the GIL in bursts: on 2 loaded cores the 2 s test lease could lapse meanwhile, and a worker
    # whose lease lapses leaves routing, failing its requests (a crash's cost, not a model update's).
    config.worker.lease_ttl_s = 10
    config.registry.controller_tick_s = 0.1
    config.registry.controller_lease_ttl_s = 2
    source = f"file:{tiny_llama_dir}"
    versions = [generate_version(v, source, context_length=512) for v in ("c-v1", "c-v2", "c-v3")]
    mesh = await start_mesh(config, versions=versions, aliases={"bad": [("c-v1", 1)], "good": [("c-v1", 1)]},
                            worker_models=[["c-v1", "c-v2", "c-v3"]])
    yield mesh
    await mesh.stop()


class Traffic:
    """Clients sending completions to an alias, each request as a new user (so arms get their weight's share);
    failures are kept with the time they happened."""

    def __init__(self, mesh, alias: str, num_clients: int = 4):
        self.mesh, self.alias = mesh, alias
        self.failures: list[tuple[float, str]] = []
        self.served: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(num_clients)]

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            request = pb.CreateCompletionRequest(model=self.alias, prompt=PROMPT, max_tokens=w.Int32Value(value=3),
                                                 temperature=w.FloatValue(value=0.0), ignore_eos=True,
                                                 skip_cache=True, user=f"{self.alias}-{i}-{n}")
            try:
                reply = await self.mesh.stub.CreateCompletion(request, metadata=self.mesh.auth)
                self.served[reply.model] = self.served.get(reply.model, 0) + 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def wait_rollout(mesh, alias: str, state: int, timeout_s: float) -> rpb.Rollout:
    deadline = time.monotonic() + timeout_s
    while True:
        rollout = (await mesh.admin.GetRollout(rpb.GetRolloutRequest(alias=alias))).rollout
        if rollout.state == state:
            return rollout
        assert time.monotonic() < deadline, f"rollout of {alias} still {rpb.RolloutState.Name(rollout.state)}"
        await asyncio.sleep(0.05)


async def test_a_canary_failing_half_its_requests_is_rolled_back(mesh):
    await mesh.admin.SetFaultInjection(rpb.SetFaultInjectionRequest(fault=rpb.FaultInjection(
        version="c-v2", error_rate=0.5)))
    traffic = Traffic(mesh, "bad", num_clients=8)
    try:
        await asyncio.sleep(0.5)
        assert traffic.failures == []  # the stable version is healthy
        started = time.monotonic()
        await mesh.admin.StartRollout(rpb.StartRolloutRequest(policy=rpb.RolloutPolicy(
            alias="bad", target_version="c-v2", steps=[20, 50, 100], interval_s=5, min_requests=MIN_REQUESTS,
            slo=rpb.RolloutSlo(max_error_rate=0.1))))
        rollout = await wait_rollout(mesh, "bad", rpb.ROLLOUT_STATE_ROLLED_BACK, ROLLBACK_S)
        rolled_back_s = time.monotonic() - started
        alias = (await mesh.admin.GetAlias(rpb.GetAliasRequest(name="bad"))).alias
        assert [(t.version, t.weight) for t in alias.targets] == [("c-v1", 100)]
        await asyncio.sleep(1.0)  # the gateways see the alias; requests already on the canary finish
        quiet_from = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        await traffic.stop()
        await mesh.admin.SetFaultInjection(rpb.SetFaultInjectionRequest(fault=rpb.FaultInjection(version="c-v2")))
    errors = [f for t, f in traffic.failures]
    print(f"\nrollback after {rolled_back_s:.2f} s, {len(errors)} client errors, reason: {rollout.reason}")
    assert "SLO breached at 20%" in rollout.reason and "server-error rate" in rollout.reason
    assert 0 < len(errors) <= MAX_ERRORS and all(e.startswith("INTERNAL") and "'c-v2'" in e for e in errors), errors
    assert not [t for t, _ in traffic.failures if t >= quiet_from]  # none once the rollback reached the gateways
    events = (await mesh.admin.ListRolloutEvents(rpb.ListRolloutEventsRequest(alias="bad"))).events
    assert [e.decision for e in events if e.decision != "wait"] == ["start", "rollback"]
    decided = events[-1]
    assert decided.canary_percent == 0 and decided.canary.requests >= MIN_REQUESTS
    assert decided.canary.server_errors / decided.canary.requests > 0.1
    assert dict(decided.canary.errors) == {"INTERNAL": decided.canary.server_errors}
    assert decided.controller and decided.controller != "admin"


async def test_a_healthy_canary_is_promoted_through_every_step(mesh):
    traffic = Traffic(mesh, "good")
    try:
        await mesh.admin.StartRollout(rpb.StartRolloutRequest(policy=rpb.RolloutPolicy(
            alias="good", target_version="c-v3", steps=[20, 50, 100], interval_s=0.6, min_requests=5,
            slo=rpb.RolloutSlo(max_error_rate=0.05, max_p95_latency_ratio=20, max_p95_latency_s=10))))
        with pytest.raises(grpc.aio.AioRpcError) as err:  # one rollout at a time
            await mesh.admin.StartRollout(rpb.StartRolloutRequest(policy=rpb.RolloutPolicy(
                alias="good", target_version="c-v2")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rollout = await wait_rollout(mesh, "good", rpb.ROLLOUT_STATE_PROMOTED, 30)
    finally:
        await traffic.stop()
    assert traffic.failures == []
    alias = (await mesh.admin.GetAlias(rpb.GetAliasRequest(name="good"))).alias
    assert [(t.version, t.weight) for t in alias.targets] == [("c-v3", 100)]
    events = (await mesh.admin.ListRolloutEvents(rpb.ListRolloutEventsRequest(alias="good"))).events
    assert [(e.decision, e.canary_percent) for e in events if e.decision != "wait"] == [
        ("start", 20), ("advance", 50), ("advance", 100), ("promote", 100)]
    for event in [e for e in events[1:] if e.decision != "wait"]:
        assert event.canary.requests >= 5 and event.canary.server_errors == 0 and "healthy" in event.reason
    assert rollout.reason.startswith("promoted")


async def test_operators_pause_resume_and_abort_and_bad_policies_are_refused(mesh):
    await mesh.admin.SetAlias(rpb.SetAliasRequest(alias=rpb.Alias(name="ops", targets=[
        rpb.TrafficSplit(version="c-v1", weight=1)])))
    for policy, needle in ((rpb.RolloutPolicy(alias="ops", target_version="c-v3", steps=[50, 20, 100]), "steps"),
                           (rpb.RolloutPolicy(alias="ops", target_version="c-v3", steps=[5, 50]), "ending at 100"),
                           (rpb.RolloutPolicy(alias="ops", target_version="c-v1"), "nothing to roll out"),
                           (rpb.RolloutPolicy(alias="ops", target_version="c-v3",
                                              slo=rpb.RolloutSlo(max_error_rate=2)), "max_error_rate")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.StartRollout(rpb.StartRolloutRequest(policy=policy))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    await mesh.admin.StartRollout(rpb.StartRolloutRequest(policy=rpb.RolloutPolicy(
        alias="ops", target_version="c-v3", interval_s=600)))
    control = mesh.admin.ControlRollout
    paused = (await control(rpb.ControlRolloutRequest(alias="ops", action=rpb.ROLLOUT_ACTION_PAUSE))).rollout
    assert paused.state == rpb.ROLLOUT_STATE_PAUSED
    resumed = (await control(rpb.ControlRolloutRequest(alias="ops", action=rpb.ROLLOUT_ACTION_RESUME))).rollout
    assert resumed.state == rpb.ROLLOUT_STATE_PROGRESSING
    aborted = (await control(rpb.ControlRolloutRequest(alias="ops", action=rpb.ROLLOUT_ACTION_ABORT))).rollout
    assert aborted.state == rpb.ROLLOUT_STATE_ROLLED_BACK
    alias = (await mesh.admin.GetAlias(rpb.GetAliasRequest(name="ops"))).alias
    assert [(t.version, t.weight) for t in alias.targets] == [("c-v1", 100)]
    events = (await mesh.admin.ListRolloutEvents(rpb.ListRolloutEventsRequest(alias="ops"))).events
    assert [e.decision for e in events] == ["start", "pause", "resume", "abort"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control(rpb.ControlRolloutRequest(alias="ops", action=rpb.ROLLOUT_ACTION_PAUSE))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_one_controller_leads_and_the_other_takes_over_when_it_stops(mesh):
    store = mesh.registry.controller.store
    others = [Controller(store, mesh.registry.redis, mesh.config.etcd.prefix, tick_s=0.1, lease_ttl_s=2)
              for _ in range(2)]
    for controller in others:
        controller.start()
    try:
        everyone = [mesh.registry.controller, *others]
        await asyncio.sleep(1.0)
        assert [c.is_leader for c in everyone].count(True) == 1
        leader = next(c for c in everyone if c.is_leader)
        follower = next(c for c in everyone if not c.is_leader)
        rollout = (await mesh.admin.GetRollout(rpb.GetRolloutRequest(alias="ops"))).rollout
        assert not await follower.commit(rollout, None, "wait", "a follower must not write", rpb.ArmStats(),
                                         rpb.ArmStats())  # fenced by the leader key
        await leader.stop()
        deadline = time.monotonic() + 5
        while not any(c.is_leader for c in everyone if c is not leader):
            assert time.monotonic() < deadline, "no controller took over"
            await asyncio.sleep(0.05)
    finally:
        for controller in others:
            await controller.stop()
        if not mesh.registry.controller.is_leader:
            mesh.registry.controller.start()


async def test_fault_injection_is_refused_in_a_production_profile(mesh):
    config = copy.deepcopy(mesh.config)
    config.registry.profile = "production"
    config.registry.controller = False
    registry = RegistryApp(config)
    port = await registry.start()
    channel = tls.aio_channel(f"127.0.0.1:{port}", config.security, "client")
    try:
        stub = registry_stub(channel, mesh.admin_key)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetFaultInjection(rpb.SetFaultInjectionRequest(fault=rpb.FaultInjection(
                version="c-v1", error_rate=0.5)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "allow_fault_injection" in \
            err.value.details()
        await stub.SetFaultInjection(rpb.SetFaultInjectionRequest(fault=rpb.FaultInjection(version="c-v1")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.SetFaultInjection(rpb.SetFaultInjectionRequest(fault=rpb.FaultInjection(
                version="c-v1", error_rate=1.5)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await registry.stop(0)


async def test_the_cli_reads_state_statistics_and_decisions(mesh, capsys):
    from llmserve.clients.cli import main

    flags = ["--registry", f"127.0.0.1:{mesh.registry.service.port}", "--admin-key", mesh.admin_key]

    async def cli(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*argv, *flags])
        return code, capsys.readouterr().out

    code, out = await cli("models", "load", "c-v1", "--wait", "10")
    assert code == 0 and "c-v1: assigned to default" in out and "c-v1: ready" in out
    code, out = await cli("models", "status", "c-v1")
    assert code == 0 and f"{mesh.workers[0].worker_id} (default): ready" in out
    code, out = await cli("experiments", "stats", "--alias", "bad")
    assert code == 0 and "bad -> c-v1 (weight 100)" in out and "bad -> c-v2 (weight 0)" in out and "INTERNAL" in out
    code, out = await cli("rollout", "events", "bad")
    assert code == 0 and "rollback" in out and "server-error rate" in out
    code, out = await cli("rollout", "status", "bad")
    assert code == 0 and out.startswith("bad: rolled_back, c-v2 at 0%")
    code, out = await cli("models", "faults", "c-v3", "--latency-ms", "5")
    assert code == 0 and "added latency 5 ms" in out
    code, out = await cli("models", "faults", "c-v3")
    assert code == 0 and "(cleared)" in out
    code = await asyncio.to_thread(main, ["models", "drain", "c-v3", *flags])
    assert code == 1 and "FAILED_PRECONDITION" in capsys.readouterr().err  # alias good routes to it
