"""Faults with traffic running: the regression tests of what bench/chaos.py found, and its bounded run."""

from __future__ import annotations

import asyncio
import copy
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common.net import free_port
from llmserve.common.server import CHANNEL_OPTIONS, Service
from llmserve.gateway.app import GatewayApp
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
