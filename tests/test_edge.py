"""Tenants, keys, model access, priority caps, and exact rate limits and budgets across two gateways sharing
one real Redis (and one real etcd, scheduler and worker)."""

from __future__ import annotations

import asyncio
import copy

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.gateway.app import GatewayApp
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    model_dir = tiny_llama_dir
    config = make_config()
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{model_dir}", context_length=512),
                                              generate_version("other-model-v1", f"file:{model_dir}")],
                            aliases={"tiny": [(TINY, 1)], "other": [("other-model-v1", 1)]},
                            worker_models=[[TINY, "other-model-v1"]])
    # A second gateway replica on the same etcd, Redis and scheduler.
    second_config = copy.deepcopy(mesh.config)
    mesh.gateway2 = GatewayApp(second_config)
    port = await mesh.gateway2.start()
    mesh.channel2 = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    mesh.stub2 = inference_pb2_grpc.InferenceServiceStub(mesh.channel2)
    yield mesh
    await mesh.channel2.close()
    await mesh.gateway2.stop(0)
    await mesh.stop()


_names = iter(f"t{i}" for i in range(1000))


async def tenant(mesh, **settings) -> tuple[str, tuple]:
    """A fresh tenant with the given settings and a key, visible to both gateways."""
    name = next(_names)
    key_limits = {k: settings.pop(k) for k in ("key_rpm", "key_tpm") if k in settings}
    await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name=name, **settings)))
    made = await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(
        tenant=name, requests_per_minute=key_limits.get("key_rpm", 0),
        tokens_per_minute=key_limits.get("key_tpm", 0)))
    for gateway in (mesh.gateway, mesh.gateway2):
        assert await gateway.view.keys.wait_for(lambda s: made.api_key.key_hash in s, 5)
        assert await gateway.view.tenants.wait_for(lambda s: name in s, 5)
    return name, (("authorization", f"Bearer {made.key}"),)


def request(**kw) -> pb.CreateCompletionRequest:
    fields = dict(model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=2), ignore_eos=True,
                  skip_cache=True)
    fields.update(kw)
    return pb.CreateCompletionRequest(**fields)


async def hammer(mesh, auth, count: int, req=None) -> tuple[int, list[grpc.aio.AioRpcError]]:
    """count concurrent requests, alternating between the two gateways."""
    async def one(i):
        stub = mesh.stub if i % 2 == 0 else mesh.stub2
        try:
            await stub.CreateCompletion(req or request(), metadata=auth, timeout=60)
            return None
        except grpc.aio.AioRpcError as exc:
            return exc
    results = await asyncio.gather(*(one(i) for i in range(count)))
    errors = [r for r in results if r is not None]
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), [e.details() for e in errors]
    return count - len(errors), errors


async def test_tenant_and_key_validation(mesh):
    for bad, needle in [(tpb.Tenant(name="Bad Name"), "tenant.name"),
                        (tpb.Tenant(name="x", requests_per_minute=-1), "requests_per_minute"),
                        (tpb.Tenant(name="x", budget_usd=-2), "budget_usd")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    name, _ = await tenant(mesh)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name=name)))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_rotated_key_stops_working_and_the_new_one_works(mesh):
    name, auth = await tenant(mesh)
    (old,) = (await mesh.tenants.ListApiKeys(tpb.ListApiKeysRequest(tenant=name))).api_keys
    rotated = await mesh.tenants.RotateApiKey(tpb.RotateApiKeyRequest(key_id=old.key_id))
    new_auth = (("authorization", f"Bearer {rotated.key}"),)
    assert await mesh.gateway.view.keys.wait_for(
        lambda s: rotated.api_key.key_hash in s and s[old.key_hash].revoked, 1.0)
    assert (await mesh.stub.CreateCompletion(request(), metadata=new_auth)).choices
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(request(), metadata=auth)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_model_access_and_priority_cap(mesh):
    _, auth = await tenant(mesh, allowed_models=["tiny*"], max_priority=pb.PRIORITY_STANDARD)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(request(model="other"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "tiny*" in err.value.details()
    models = [m.id for m in (await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=auth)).data]
    assert models == ["tiny", TINY]
    call = mesh.stub.CreateCompletion(request(priority=pb.PRIORITY_INTERACTIVE), metadata=auth)
    await call
    note = dict(await call.initial_metadata())["x-llmserve-priority"]
    assert note == "PRIORITY_STANDARD (capped from PRIORITY_INTERACTIVE)"
    call = mesh.stub.CreateCompletion(request(priority=pb.PRIORITY_BATCH), metadata=auth)
    await call
    assert "x-llmserve-priority" not in dict(await call.initial_metadata())


async def test_requests_per_minute_are_exact_across_two_gateways(mesh):
    _, auth = await tenant(mesh, requests_per_minute=7)
    admitted, errors = await hammer(mesh, auth, 24)
    assert admitted == 7
    retry = dict(errors[0].trailing_metadata())["retry-after"]
    assert 1 <= int(retry) <= 60 and "requests per minute of tenant" in errors[0].details()


async def test_key_limit_applies_below_the_tenant_limit(mesh):
    _, auth = await tenant(mesh, requests_per_minute=100, key_rpm=3)
    admitted, errors = await hammer(mesh, auth, 10)
    assert admitted == 3 and "of key key_" in errors[0].details()


async def test_tokens_per_minute_are_exact_and_count_prompt_plus_max_tokens(mesh):
    # "Hello there" is 2 prompt tokens; each request reserves 2 + 2 = 4 tokens; 4 * 5 = 20 fit in 22.
    _, auth = await tenant(mesh, tokens_per_minute=22)
    admitted, errors = await hammer(mesh, auth, 16)
    assert admitted == 5 and "tokens per minute" in errors[0].details()
    # A request that can never fit is told so, without a retry-after.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(request(max_tokens=w.Int32Value(value=100)), metadata=auth)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "lower max_tokens" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert trailers["x-should-retry"] == "false" and "retry-after" not in trailers


async def test_token_reservations_are_reconciled_to_real_usage(mesh, redis_srv):
    import redis.asyncio as aioredis
    name, auth = await tenant(mesh, tokens_per_minute=100_000)
    greedy = w.FloatValue(value=0.0)
    free = await mesh.stub.CreateCompletion(request(max_tokens=w.Int32Value(value=30), temperature=greedy),
                                            metadata=auth)
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    short = await mesh.stub.CreateCompletion(request(max_tokens=w.Int32Value(value=30), temperature=greedy,
                                                     stop=[stop]), metadata=auth)
    assert short.usage.completion_tokens < 30, (repr(text), repr(stop), repr(short.choices[0].text))
    client = aioredis.Redis(port=redis_srv.port)
    used = int(await client.get(f"llmserve:rl:{{{name}}}:tok:sum"))
    await client.aclose()
    assert used == free.usage.total_tokens + short.usage.total_tokens


async def test_budget_is_never_exceeded_across_two_gateways(mesh):
    # Prices: 0.1 / 0.2 USD per 1K prompt / completion tokens. A request reserves 2 * 0.0001 + 2 * 0.0002 =
    # 0.0006 USD; a budget of 0.0040 admits exactly 6 of them.
    name, auth = await tenant(mesh, budget_usd=0.004, budget_period=tpb.BUDGET_PERIOD_DAY)
    admitted, errors = await hammer(mesh, auth, 20)
    assert admitted == 6 and "budget" in errors[0].details()
    for gateway in (mesh.gateway, mesh.gateway2):
        await gateway.edge.usage.flush()
    usage = await mesh.tenants.GetUsage(tpb.GetUsageRequest(tenant=name))
    assert usage.period_spend_usd <= 0.004
    assert usage.period_spend_usd == pytest.approx(6 * 0.0006)
    assert usage.total_cost_usd == pytest.approx(6 * 0.0006)
    assert sum(r.requests for r in usage.rows) == 6


async def test_limits_fail_open_by_default_and_closed_when_configured(mesh, redis_srv):
    _, auth = await tenant(mesh, requests_per_minute=1000)
    closed_config = copy.deepcopy(mesh.config)
    closed_config.gateway.limits_fail_open = False
    closed = GatewayApp(closed_config)
    port = await closed.start()
    await closed.view.tenants.wait_for(lambda s: len(s) > 0, 5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    closed_stub = inference_pb2_grpc.InferenceServiceStub(channel)
    redis_srv.pause()
    try:
        assert (await mesh.stub.CreateCompletion(request(), metadata=auth)).choices  # fail open
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await closed_stub.CreateCompletion(request(), metadata=auth)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "fail closed" in err.value.details()
    finally:
        redis_srv.resume()
        await channel.close()
        await closed.stop(0)


async def test_a_prompt_over_the_context_length_is_refused_before_any_limit_is_touched(mesh, redis_srv):
    import redis.asyncio as aioredis
    name, auth = await tenant(mesh, requests_per_minute=1, tokens_per_minute=100_000, budget_usd=1.0,
                              budget_period=tpb.BUDGET_PERIOD_DAY)
    version = mesh.gateway.view.versions.snapshot[TINY]
    for gateway in (mesh.gateway, mesh.gateway2):
        await gateway.tokens.tokenizer(version)  # warmed at start: wait until it is loaded
    long_prompt = "word " * 600  # 601 tokens; the version's context length is 512
    for stub in (mesh.stub, mesh.stub2):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateCompletion(request(prompt=long_prompt), metadata=auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("prompt is 601 tokens, but model 'tiny-llama-v1' has a context "
                                              "length of 512 tokens: shorten the prompt")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            model="tiny", messages=[pb.ChatMessage(role="user", content=long_prompt)]), metadata=auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages is" in err.value.details()
    # No limit, budget or usage counter of the tenant moved ...
    for gateway in (mesh.gateway, mesh.gateway2):
        await gateway.edge.usage.flush()
    client = aioredis.Redis(port=redis_srv.port)
    patterns = (f"llmserve:rl:{{{name}}}:*", f"llmserve:spend:{{{name}}}:*", f"llmserve:usage:{name}:*")
    touched = [k for pattern in patterns for k in await client.keys(pattern)]
    await client.aclose()
    assert touched == []
    assert not (await mesh.tenants.GetUsage(tpb.GetUsageRequest(tenant=name))).rows
    # ... so the one request a minute is still there to use.
    assert (await mesh.stub.CreateCompletion(request(), metadata=auth)).choices


async def test_queue_time_reaches_the_request_log_and_worker_ids_only_x_llmserve_worker(mesh):
    from structlog.testing import capture_logs
    _, auth = await tenant(mesh)
    with capture_logs() as logs:
        call = mesh.stub.CreateCompletion(request(n=w.Int32Value(value=2)), metadata=auth)
        await call
    (line,) = [e for e in logs if e["event"] == "request" and e.get("kind") == "completion"]
    assert line["code"] == "OK" and isinstance(line["queue_ms"], float) and line["queue_ms"] >= 0
    metadata = [*await call.initial_metadata(), *await call.trailing_metadata()]
    # The serving worker is named in x-llmserve-worker (issue 11), and in no other header or trailer.
    ids = {worker.worker_id for worker in mesh.workers}
    named = [v for k, v in metadata if k == "x-llmserve-worker"]
    assert len(named) == 1 and set(str(named[0]).split(",")) <= ids and set(str(named[0]).split(","))
    assert all(i not in str(v) for i in ids for k, v in metadata if k != "x-llmserve-worker")
    # A stream names its worker in the initial metadata too, before its first chunk (the REST sidecar's SSE
    # headers are written from it), and every worker in the trailer.
    stream = mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=2), ignore_eos=True, skip_cache=True),
        metadata=auth)
    chunks = [chunk async for chunk in stream]
    initial, trailing = await stream.initial_metadata(), await stream.trailing_metadata()
    first = [v for k, v in initial if k == "x-llmserve-worker"]
    assert len(first) == 1 and first[0] in ids and [v for k, v in trailing if k == "x-llmserve-worker"] == first
    assert all(i not in str(v) for i in ids for k, v in [*initial, *trailing] if k != "x-llmserve-worker")
    assert chunks and all(i not in str(chunk) for i in ids for chunk in chunks)
