"""Scheduler replicas behind one gateway: schedulers register in etcd under a lease and the gateway spreads tasks over
the live ones; a scheduler SIGKILLed with streams in flight costs no text (the gateway resumes each stream on the
other scheduler from the tokens already sent), one that registers later is picked up and one whose lease lapses is
dropped (real scheduler processes, in-process gateway and worker, tiny model)."""

from __future__ import annotations

import asyncio
import functools
import signal
import time

import pytest

from llmserve.clients.client import _params
from llmserve.common import etcd as etcd_mod
from llmserve.common.config import LaunchConfig, load_config
from llmserve.common.net import free_port
from llmserve.common.state.store import Store
from llmserve.gateway import metrics
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.scheduler.app import SchedulerApp
from tests.helpers.mesh import generate_version, start_mesh
from tests.helpers.processes import ServiceProcess

TINY = "tiny-llama-v1"
PROMPT = "Once upon a time, in a land far away, there lived"
MAX_TOKENS = 200


class SchedulerProcess(ServiceProcess):
    def __init__(self, config, directory, name: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        super().__init__(config, directory, "scheduler", name, port=self.port, metrics_port=0,
                         scheduler_id=f"replica-{name}")


def _failovers(outcome: str) -> float:
    return metrics.SCHEDULER_FAILOVERS.labels(outcome)._value.get()


async def _choices(mesh, on_chunk=None, **params) -> dict[int, tuple[str, str]]:
    """choice index -> (text, finish reason) of one streamed completion."""
    call = mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        model="tiny", prompt=PROMPT, **_params(**{"max_tokens": MAX_TOKENS, "skip_cache": True, "ignore_eos": True,
                                                   "temperature": 0.0, **params})),
        metadata=mesh.auth, timeout=120)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = 0
    async for chunk in call:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index, "")
        chunks += 1
        if on_chunk is not None:
            on_chunk(chunks)
    return {j: (texts[j], reasons.get(j, "")) for j in sorted(texts)}


async def _stream(mesh, on_chunk=None, **params) -> tuple[str, str]:
    """(text, finish reason) of one streamed completion of one choice."""
    return (await _choices(mesh, on_chunk, **params))[0]


async def _wait_serving(mesh, replica: SchedulerProcess, timeout_s: float = 60) -> None:
    """Until the replica is in the gateway's pool, READY, and serves tasks (it answers UNAVAILABLE, which the
    gateway moves to the other scheduler, until its Serve stream to the worker is up)."""
    pool = mesh.gateway.schedulers
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "the replica did not start serving"
        found = pool.schedulers.get(replica.address)
        if found is not None and found.ids and found.is_ready:
            before = _failovers("restarted")
            for _ in range(4):  # in turns over the two idle schedulers
                await _stream(mesh, max_tokens=1)
            if _failovers("restarted") == before:
                return
        await asyncio.sleep(0.2)


@pytest.fixture
async def replicas(make_config, tiny_llama_dir, tmp_path):
    """The mesh's in-process scheduler and one scheduler process, both registered, both serving the worker."""
    config = make_config()
    config.security.mesh_token = "replicas-test-token"
    config.scheduler.lease_ttl_s = 2
    config.gateway.scheduler_cooldown_s = 2.0
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    replica = SchedulerProcess(config, tmp_path, "b")
    try:
        await _wait_serving(mesh, replica)
        yield mesh, replica
    finally:
        replica.stop()
        await mesh.stop()


async def test_a_scheduler_killed_with_streams_in_flight_costs_no_text(replicas):
    mesh, replica = replicas
    expected, reason = await _stream(mesh)
    assert reason == "length"
    pool = mesh.gateway.schedulers
    on_replica: list[int] = []
    chunks = [0] * 4

    def kill_once_under_way(stream: int, n: int) -> None:
        chunks[stream] = n
        if min(chunks) >= 5 and not on_replica:  # every stream is under way: SIGKILL the scheduler serving some
            on_replica.append(pool.schedulers[replica.address].num_inflight)
            replica.proc.kill()

    resumed = _failovers("resumed")
    results = await asyncio.gather(*(_stream(mesh, on_chunk=functools.partial(kill_once_under_way, i))
                                     for i in range(4)))
    assert on_replica and on_replica[0] >= 1, "no stream ran on the killed scheduler"  # least in flight: 2 of 4
    assert results == [(expected, "length")] * 4  # each one uninterrupted, the undisturbed text
    assert _failovers("resumed") - resumed == on_replica[0]
    for _ in range(3):  # new requests keep being served, by the scheduler left
        assert (await _stream(mesh, max_tokens=4))[1] == "length"


async def test_a_stream_of_n_choices_moves_too_each_choice_from_where_it_was(replicas):
    mesh, replica = replicas
    params = dict(n=2, temperature=1.0, seed=5)
    expected = await _choices(mesh, **params)
    assert [reason for _, reason in expected.values()] == ["length", "length"]
    pool = mesh.gateway.schedulers
    pool.schedulers[mesh.config.gateway.scheduler_address].num_inflight += 1  # the stream goes to the replica

    def kill(n: int) -> None:
        if n == 6:
            replica.proc.kill()
    resumed = _failovers("resumed")
    try:
        moved = await _choices(mesh, on_chunk=kill, **params)
    finally:
        pool.schedulers[mesh.config.gateway.scheduler_address].num_inflight -= 1
    assert replica.proc.poll() is not None and _failovers("resumed") - resumed == 1
    assert moved == expected  # both choices, seeded, with the undisturbed texts


async def test_the_gateway_picks_up_a_later_scheduler_and_drops_one_whose_lease_lapsed(make_config, tiny_llama_dir,
                                                                                       tmp_path):
    config = make_config()
    config.security.mesh_token = "replicas-test-token"
    config.scheduler.lease_ttl_s = 2
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    pool = mesh.gateway.schedulers
    replica = SchedulerProcess(config, tmp_path, "late")
    try:
        assert list(pool.schedulers) == [config.gateway.scheduler_address]
        await _wait_serving(mesh, replica)  # registered after the gateway started: found by the watch
        assert pool.schedulers[replica.address].ids == {"replica-late"}
        # Hung (SIGSTOP): its channel stays READY, but its lease lapses and the gateway drops it.
        replica.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while replica.address in pool.schedulers:
            assert time.monotonic() - stopped < config.scheduler.lease_ttl_s + 3, "the lapsed scheduler stayed"
            await asyncio.sleep(0.05)
        for _ in range(4):  # nothing goes to the hung one
            assert (await _stream(mesh, max_tokens=2))[1] == "length"
        replica.proc.send_signal(signal.SIGCONT)  # it registers again and is picked up again
        await _wait_serving(mesh, replica, timeout_s=15)
    finally:
        replica.stop()
        await mesh.stop()


async def test_a_scheduler_registers_an_address_gateways_can_dial(make_config):
    """Its listening address, or scheduler.advertise_address; on 0.0.0.0 without one it stays out of etcd (gateways
    would dial themselves) and is reached at the gateways' configured addresses. A clean stop revokes the lease."""
    config = make_config()
    store = Store(etcd_mod.connect(config.etcd), config.etcd.prefix)
    try:
        for host, advertise, expected in [("127.0.0.1", "", "127.0.0.1:{port}"), ("0.0.0.0", "", None),
                                          ("0.0.0.0", "sched-b.internal:7000", "sched-b.internal:7000")]:
            config.scheduler.host, config.scheduler.advertise_address = host, advertise
            scheduler = SchedulerApp(config)
            port = await scheduler.start()
            try:
                found = [r.address for r in await store.schedulers.list()]
                assert found == ([expected.format(port=port)] if expected else []), (host, advertise)
            finally:
                await scheduler.stop(0)
            assert await store.schedulers.list() == []
    finally:
        await store.client.close()


def test_replica_settings_are_validated_and_read_from_the_environment():
    config = load_config(env={"LLMSERVE_LAUNCH__SCHEDULERS": "2", "LLMSERVE_LAUNCH__SCHEDULER_PORTS": "50052,50054",
                              "LLMSERVE_GATEWAY__SCHEDULER_ADDRESSES": "10.0.0.2:50052,sched-b:7000",
                              "LLMSERVE_GATEWAY__MAX_SCHEDULER_FAILOVERS": "3"})
    assert (config.launch.schedulers, config.launch.scheduler_ports) == (2, [50052, 50054])
    assert config.gateway.scheduler_addresses == ["10.0.0.2:50052", "sched-b:7000"]
    assert config.gateway.max_scheduler_failovers == 3 and config.gateway.discover_schedulers
    for bad in (LaunchConfig(schedulers=0), LaunchConfig(schedulers=1, scheduler_ports=[9000, 9001]),
                LaunchConfig(schedulers=2, scheduler_ports=[9000, 9000]),
                LaunchConfig(schedulers=2, scheduler_ports=[50052, 50061])):  # worker 0's port
        with pytest.raises(ValueError, match="launch.scheduler"):
            bad.validate(50061)
    for env, match in [({"LLMSERVE_GATEWAY__SCHEDULER_ADDRESSES": "nohost"}, "must be host:port"),
                       ({"LLMSERVE_GATEWAY__SCHEDULER_ADDRESS": "h:99999"}, "must be host:port"),
                       ({"LLMSERVE_GATEWAY__MAX_SCHEDULER_FAILOVERS": "-1"}, "max_scheduler_failovers=-1"),
                       ({"LLMSERVE_GATEWAY__SCHEDULER_COOLDOWN_S": "-1"}, "scheduler_cooldown_s=-1"),
                       ({"LLMSERVE_SCHEDULER__LEASE_TTL_S": "1"}, "scheduler.lease_ttl_s=1")]:
        with pytest.raises(ValueError, match=match):
            load_config(env=env)
