"""Per-key and per-tenant caps on concurrent requests, exact across two gateway replicas sharing one real Redis
(and one real etcd, registry, scheduler and worker): a tenant at its cap gets RESOURCE_EXHAUSTED while another is
served, a slot is freed however its request ends, and a dead gateway's slots come back when their lease passes.

A request weighs the sequences it runs (prompts x n)."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.gateway.app import GatewayApp
from llmserve.gateway.limits import Limit, Limiter, LimitExceeded
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"
IDLE = "idle-v1"  # registered, served by no worker: admitted, then UNAVAILABLE from the scheduler


def inflight(tenant: str, cap: int, amount: int = 1) -> Limit:
    key = f"llmserve:rl:{{{tenant}}}:inflight"
    return Limit("concurrent sequences", "i", (key, key + ":sum"), cap, amount, "sequences")


async def test_a_dead_gateways_slots_come_back_when_their_lease_passes(redis_srv):
    client = aioredis.Redis(port=redis_srv.port)
    try:
        limiter = Limiter(client, lease_s=0.3)
        tenant = f"lease{uuid.uuid4().hex[:8]}"
        await limiter.admit("dead", [inflight(tenant, 3, 2)])  # its gateway never settles nor renews
        kept = await limiter.admit("kept", [inflight(tenant, 3, 1)])  # its gateway renews it
        with pytest.raises(LimitExceeded) as full:
            await limiter.admit("next", [inflight(tenant, 3, 1)])
        assert full.value.used == 3 and full.value.retry_after_s == 1.0
        for _ in range(3):
            await asyncio.sleep(0.15)
            await limiter.renew([kept])
        assert await limiter.admit("next", [inflight(tenant, 3, 2)])  # the dead one's 2 are back, kept's 1 is not
        with pytest.raises(LimitExceeded):
            await limiter.admit("more", [inflight(tenant, 3, 1)])
        await limiter.reconcile(kept, {})
        assert await limiter.admit("more", [inflight(tenant, 3, 1)])
        with pytest.raises(LimitExceeded) as never:
            await limiter.admit("huge", [inflight(tenant, 3, 4)])
        assert never.value.retry_after_s is None  # can never fit: not worth a retry
    finally:
        await client.aclose()


async def test_the_running_sum_is_counted_again_when_it_went_missing(redis_srv):
    """Admission reads a running sum, not the whole set; a sum lost apart from its set is rebuilt from it."""
    client = aioredis.Redis(port=redis_srv.port)
    try:
        limiter = Limiter(client)
        tenant = f"sum{uuid.uuid4().hex[:8]}"
        held = [await limiter.admit(f"r{w}", [inflight(tenant, 7, w)]) for w in (1, 2, 3)]
        zset, total = inflight(tenant, 7).keys
        assert int(await client.get(total)) == 6
        await client.delete(total)
        assert await limiter.admit("fits", [inflight(tenant, 7, 1)])  # 6 + 1
        with pytest.raises(LimitExceeded) as full:
            await limiter.admit("over", [inflight(tenant, 7, 1)])
        assert full.value.used == 7 and 0 < await client.pttl(total) <= 30_000
        for reservation in held:
            await limiter.reconcile(reservation, {})
        assert int(await client.get(total)) == 1 and await client.zcard(zset) == 1
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    config = make_config()
    config.gateway.concurrency_lease_s = 1.0  # renewed every third of a second: long streams outlive it
    config.redis.timeout_s = 5.0  # a busy machine must not make admissions fail open (no slot taken)
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}"),
                                              generate_version(IDLE, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    mesh.gateway2 = GatewayApp(copy.deepcopy(mesh.config))  # a second replica on the same etcd, Redis, scheduler
    mesh.channel2 = grpc.aio.insecure_channel(f"127.0.0.1:{await mesh.gateway2.start()}")
    mesh.stub2 = inference_pb2_grpc.InferenceServiceStub(mesh.channel2)
    mesh.redis = aioredis.Redis.from_url(config.redis.url)
    yield mesh
    await mesh.redis.aclose()
    await mesh.channel2.close()
    await mesh.gateway2.stop(0)
    await mesh.stop()


async def tenant(mesh, key_cap: int = 0, **settings) -> tuple[str, tuple, str]:
    """A fresh tenant and key visible to both gateways: (name, auth metadata, key id)."""
    name = f"conc{uuid.uuid4().hex[:10]}"
    await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name=name, **settings)))
    return (name, *await key(mesh, name, key_cap))


async def key(mesh, name: str, cap: int = 0) -> tuple[tuple, str]:
    made = await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant=name, max_concurrent_requests=cap))
    for gateway in (mesh.gateway, mesh.gateway2):
        assert await gateway.view.keys.wait_for(lambda s: made.api_key.key_hash in s, 5)
        assert await gateway.view.tenants.wait_for(lambda s: name in s, 5)
    return (("authorization", f"Bearer {made.key}"),), made.api_key.key_id


def request(max_tokens: int = 2, **kw) -> pb.CreateCompletionRequest:
    fields = dict(model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=max_tokens), ignore_eos=True,
                  skip_cache=True)
    fields.update(kw)
    return pb.CreateCompletionRequest(**fields)


async def long_stream(stub, auth, n: int = 1):
    """A stream that runs far longer than the test (1900 tokens per choice), started: its first chunk came."""
    call = stub.StreamCompletion(request(max_tokens=1900, n=w.Int32Value(value=n)), metadata=auth)
    await anext(aiter(call))
    return call


async def refused(stub, auth, req=None) -> grpc.aio.AioRpcError | None:
    try:
        await stub.CreateCompletion(req or request(), metadata=auth, timeout=30)
        return None
    except grpc.aio.AioRpcError as exc:
        return exc


async def in_flight(mesh, name: str) -> int:
    return sum([await mesh.redis.zcard(k) for k in await mesh.redis.keys(f"llmserve:rl:{{{name}}}:*inflight")])


async def eventually(check, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_a_tenant_at_its_cap_is_refused_on_every_replica_while_another_is_served(mesh):
    a, a_auth, _ = await tenant(mesh, max_concurrent_requests=2)
    _, b_auth, _ = await tenant(mesh, max_concurrent_requests=2)
    stream = await long_stream(mesh.stub, a_auth, n=2)  # both of A's slots, taken on gateway 1
    try:
        for stub in (mesh.stub2, mesh.stub):  # gateway 2 sees gateway 1's count
            err = await refused(stub, a_auth)
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (f"concurrency cap reached: 2 concurrent sequences of tenant {a} are running and the cap is 2"
                    in err.details())
            assert f"llmserve tenants update {a} --max-concurrent N" in err.details()
            assert dict(err.trailing_metadata())["retry-after"] == "1"
        for stub in (mesh.stub, mesh.stub2):
            assert await refused(stub, b_auth) is None  # B is served meanwhile
        stream.cancel()  # the client hangs up: A's slots are free again, on both replicas
        assert await eventually(lambda: refused_is_none(mesh.stub2, a_auth))
        assert await eventually(lambda: no_slots(mesh, a))
    finally:
        stream.cancel()


async def refused_is_none(stub, auth) -> bool:
    return await refused(stub, auth) is None


async def no_slots(mesh, name: str) -> bool:
    return await in_flight(mesh, name) == 0


async def test_a_key_cap_refuses_that_key_only_and_raising_a_tenant_cap_takes_effect_live(mesh):
    name, capped, key_id = await tenant(mesh, key_cap=1, max_concurrent_requests=1)
    other, _ = await key(mesh, name)
    stream = await long_stream(mesh.stub2, capped)
    try:
        err = await refused(mesh.stub, capped)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"1 concurrent sequences of key {key_id} are running and the cap is 1" in err.details()
        assert "--max-concurrent" in err.details()
        err = await refused(mesh.stub, other)  # the tenant's own cap (1) is full too
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and f"tenant {name}" in err.details()
        await mesh.tenants.UpdateTenant(tpb.UpdateTenantRequest(tenant=tpb.Tenant(name=name,
                                                                                  max_concurrent_requests=3)))
        for gateway in (mesh.gateway, mesh.gateway2):
            assert await gateway.view.tenants.wait_for(lambda s: s[name].max_concurrent_requests == 3, 5)
        assert await refused(mesh.stub, other) is None  # the other key now fits the raised tenant cap
        assert (await refused(mesh.stub, capped)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # its own cap
    finally:
        stream.cancel()


async def test_a_request_over_the_cap_by_itself_is_told_to_shrink(mesh):
    _, auth, _ = await tenant(mesh, max_concurrent_requests=2)
    err = await refused(mesh.stub, auth, request(n=w.Int32Value(value=3)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this request runs 3 sequences (prompts x n)" in err.details() and "lower n" in err.details()
    assert dict(err.trailing_metadata())["x-should-retry"] == "false"
    assert await refused(mesh.stub, auth, request(n=w.Int32Value(value=2))) is None
    _, unlimited, _ = await tenant(mesh, max_concurrent_requests=-1)  # no cap at all
    assert await refused(mesh.stub, unlimited, request(n=w.Int32Value(value=16))) is None


async def test_slots_are_freed_however_a_request_ends(mesh):
    name, auth, _ = await tenant(mesh, max_concurrent_requests=4)
    assert await refused(mesh.stub, auth) is None  # finished
    err = await refused(mesh.stub, auth, request(model=IDLE))  # admitted, then failed in the scheduler
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    for i in range(30):  # cancelled after 0-15 ms: in admission, before the first token, mid-generation
        call = (mesh.stub if i % 2 else mesh.stub2).CreateCompletion(request(max_tokens=50), metadata=auth)
        await asyncio.sleep(i / 2000)
        call.cancel()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.gateway.service.port}")  # a client that goes away
    await long_stream(inference_pb2_grpc.InferenceServiceStub(channel), auth, n=2)
    assert await in_flight(mesh, name) == 1  # its slots are taken (one member weighing 2)...
    await channel.close()
    assert await eventually(lambda: no_slots(mesh, name))  # ... and free once it went away, as all the others
    results = await asyncio.gather(*(refused(mesh.stub, auth) for _ in range(4)))  # all 4 slots are there
    assert results == [None] * 4


async def test_a_long_stream_keeps_its_slot_past_the_lease_and_a_stopped_gateway_frees_it(mesh):
    name, auth, _ = await tenant(mesh, max_concurrent_requests=1)
    gateway = GatewayApp(copy.deepcopy(mesh.config))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await gateway.start()}")
    try:
        stream = await long_stream(inference_pb2_grpc.InferenceServiceStub(channel), auth)
        await asyncio.sleep(2.5 * mesh.config.gateway.concurrency_lease_s)  # renewed, not reaped
        assert (await refused(mesh.stub, auth)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await gateway.stop(0)  # with the stream open: its slot is settled on the way down
        stream.cancel()
        assert await eventually(lambda: refused_is_none(mesh.stub, auth))
    finally:
        await channel.close()
        await gateway.stop(0)
