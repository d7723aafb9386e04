"""Faults with traffic running: the regression tests of what bench/chaos.py found, and its bounded run.

The bounded run is bench/chaos.py with every fault once and short traffic: the whole mesh under the launcher
(about 20 s to start here), then each part SIGKILLed in turn. It states what the mesh promises after a kill:
error-free again within RECOVERY_S, and no acknowledged usage or spend lost.
"""

from __future__ import annotations

import asyncio
import copy
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common.net import free_port
from llmserve.common.server import CHANNEL_OPTIONS, Service
from llmserve.gateway.app import GatewayApp
from tests.helpers import chaos
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"


async def test_a_mesh_channel_dials_a_restarted_peer_within_a_second():
    """The gateway's channel to the scheduler (and the scheduler's to workers) after the peer was down for 5 s:
    with grpc's default backoff the next dial came up to ~4 s after the peer was back, and every request in
    between failed with UNAVAILABLE."""
    port = free_port()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = health_pb2_grpc.HealthStub(channel)
    peer = None
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # nothing listens: the channel backs off between dials
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.05)
        peer = Service("peer", "127.0.0.1", port, [])
        await peer.start()
        back = time.monotonic()
        while True:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.02)
        assert time.monotonic() - back < 1.0
    finally:
        await channel.close()
        if peer is not None:
            await peer.stop(0)


async def test_a_restarted_gateway_listens_only_once_it_can_count_tokens(make_config, tiny_llama_dir):
    """Budgets and token limits need the prompt's token count; a gateway that listened before its tokenizers
    were loaded held such requests for seconds after a restart (8 s in bench/chaos.py) while its twin was idle."""
    mesh = await start_mesh(make_config(), versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    try:
        gateway = GatewayApp(copy.deepcopy(mesh.config))
        await gateway.start()
        try:
            assert gateway.tokens.is_ready(gateway.view.versions.snapshot[TINY])
        finally:
            await gateway.stop(0)
    finally:
        await mesh.stop()



async def test_requests_wait_for_a_restarting_scheduler(make_config, tiny_llama_dir):
    """A request that finds the scheduler gone waits for it (gateway.scheduler_wait_s) instead of failing."""
    from google.protobuf import wrappers_pb2 as w

    from llmserve.inference.v1 import inference_pb2 as pb
    from llmserve.scheduler.app import SchedulerApp

    config = make_config()
    config.gateway.scheduler_wait_s = 10.0
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    request = pb.CreateCompletionRequest(model="tiny", prompt="hi", max_tokens=w.Int32Value(value=2),
                                         skip_cache=True)
    try:
        assert (await mesh.stub.CreateCompletion(request, metadata=mesh.auth, timeout=10)).choices
        port = int(mesh.config.gateway.scheduler_address.rpartition(":")[2])
        await mesh.scheduler.stop(0)
        call = mesh.stub.CreateCompletion(request, metadata=mesh.auth, timeout=20)
        await asyncio.sleep(1.5)  # the request waits meanwhile
        successor_config = copy.deepcopy(mesh.config)
        successor_config.scheduler.port = port
        mesh.scheduler = SchedulerApp(successor_config)
        await mesh.scheduler.start()
        assert (await call).usage.completion_tokens == 2
    finally:
        await mesh.stop()


# Seconds after the kill by which requests succeed again (worker: the launcher restarts it after 1 s and it loads
# the tiny model, ~10 s on a busy 2-core machine; meanwhile requests wait for it in the scheduler's queue).
RECOVERY_S = {"worker": 40.0, "scheduler": 15.0, "gateway": 10.0, "redis": 10.0, "etcd": 10.0}


async def test_every_fault_once_recovers_in_time_and_loses_no_acknowledged_usage(tmp_path, tiny_llama_dir):
    settings = chaos.Settings(steady_s=0.5, quiet_s=1.0, streams=1, unary=1, max_tokens=6, think_s=0.05,
                              recover_timeout_s=60.0, settle_timeout_s=20.0)
    started = time.monotonic()
    with chaos.chaos_mesh(tmp_path / "mesh", tiny_llama_dir) as mesh:
        report = await chaos.run(mesh, list(RECOVERY_S), settings)
    assert report["baseline"]["failed"] == 0 and report["baseline"]["usage"]["ok"], report["baseline"]
    for fault in report["faults"]:
        name = fault["fault"]
        assert fault["recovered"], fault
        assert fault["first_success_s"] is not None and fault["first_success_s"] <= RECOVERY_S[name], fault
        assert fault["error_free_after_s"] <= RECOVERY_S[name], fault
        assert fault["usage"]["ok"], (name, fault["usage"])
        assert not fault["usage"]["dev"]["lost"] and not fault["usage"]["metered"]["lost"], fault["usage"]
        assert fault["usage"]["metered"]["spend_lost_micro_usd"] == 0
        # A key made after the fault is served by both gateways: their etcd watches carry on (after etcd's too).
        assert fault["new_key_served_s"] is not None and fault["new_key_served_s"] <= 5.0, fault
    # Only what the kills cut short fails: a killed gateway's own streams, a worker's in-flight tasks, the
    # scheduler's Submit streams; the other gateway, and requests sent while a worker restarts, are served.
    gateway = next(f for f in report["faults"] if f["fault"] == "gateway")
    assert gateway["failed_in_window"] <= 2 * (settings.streams + settings.unary), gateway
    print(f"chaos: {time.monotonic() - started:.0f} s")
