"""The whole mesh on a tiny random Llama (real SmolLM2 tokenizer) and MiniLM: statuses, streaming, cancellation,
cache, failover of a vanished worker. Everything runs for real: etcd, Redis, gRPC between the services."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import embed_version, generate_version, start_mesh
from tests.helpers.tiny_models import MINILM_SOURCE

TINY = "tiny-llama-v1"
TINY_INT8 = "tiny-llama-int8"
EMBED = "minilm-v1"


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_model_dir):
    config = make_config()
    mesh = await start_mesh(
        config,
        versions=[generate_version(TINY, f"file:{tiny_model_dir}", context_length=512),
                  generate_version("tiny-llama-v2", f"file:{tiny_model_dir}", context_length=512),
                  generate_version(TINY_INT8, f"file:{tiny_model_dir}", context_length=512, quantization="int8"),
                  embed_version(EMBED, MINILM_SOURCE)],
        aliases={"tiny": [(TINY, 1)], "embed": [(EMBED, 1)], "orphan": [("tiny-llama-v2", 1)]},
        worker_models=[[TINY, TINY_INT8, EMBED]])
    yield mesh
    await mesh.stop()


def completion(**kw) -> pb.CreateCompletionRequest:
    fields = dict(model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=8),
                  temperature=w.FloatValue(value=0.0))
    fields.update(kw)
    return pb.CreateCompletionRequest(**fields)


async def test_completion_names_the_concrete_version(mesh):
    response = await mesh.stub.CreateCompletion(completion(skip_cache=True), metadata=mesh.auth)
    assert response.model == TINY and response.object == "text_completion"
    assert response.id.startswith("cmpl-") and response.created > 0
    (choice,) = response.choices
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert response.usage.completion_tokens >= 1
    assert response.usage.prompt_tokens == 2  # "Hello there" is two tokens in SmolLM2's vocabulary
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


async def test_stream_equals_unary_and_ends_with_usage(mesh):
    request = completion(max_tokens=w.Int32Value(value=20), ignore_eos=True, skip_cache=True)
    unary = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    chunks = [c async for c in mesh.stub.StreamCompletion(pb.StreamCompletionRequest.FromString(
        request.SerializeToString()), metadata=mesh.auth)]
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert text == unary.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


async def test_batch_prompts_and_n(mesh):
    request = completion(prompt="", prompts=["One", "Two words"], n=w.Int32Value(value=2),
                         temperature=w.FloatValue(value=1.0), seed=w.Int64Value(value=7), skip_cache=True)
    response = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == 1 + 2  # each prompt counted once, not once per choice
    again = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # the seed reproduces


async def test_n_choices_travel_once_and_share_one_prefill(mesh):
    (served,) = [m for m in mesh.workers[0].models.values() if m.version.version == TINY]
    blocks = served.engine.block_manager
    prompt = " ".join(f"w{i}" for i in range(60))  # several KV blocks long
    request = completion(prompt=prompt, n=w.Int32Value(value=4), temperature=w.FloatValue(value=1.0),
                         seed=w.Int64Value(value=11), max_tokens=w.Int32Value(value=6), ignore_eos=True,
                         skip_cache=True)
    hits_before = blocks.num_prefix_hit_tokens
    response = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    num_prompt = response.usage.prompt_tokens
    assert num_prompt > 2 * blocks.block_size
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 4 * 6 and response.usage.prompt_tokens == num_prompt
    assert len({c.text for c in response.choices}) > 1  # choice j draws from seed + j
    # Choices 1..3 read the prompt's full blocks that choice 0 computed: the prompt is prefilled once.
    full_blocks = (num_prompt - 1) // blocks.block_size * blocks.block_size
    assert blocks.num_prefix_hit_tokens - hits_before >= 3 * full_blocks
    # Streams carry each choice's deltas and finish reason, by choice index.
    stream = pb.StreamCompletionRequest.FromString(request.SerializeToString())
    texts, reasons = ["", "", "", ""], {}
    async for chunk in mesh.stub.StreamCompletion(stream, metadata=mesh.auth):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert texts == [c.text for c in response.choices] and reasons == dict.fromkeys(range(4), "length")


async def test_a_quantized_variant_is_its_own_version_on_the_same_weights(mesh):
    (served,) = [m for m in mesh.workers[0].models.values() if m.version.version == TINY_INT8]
    assert "int8" in served.engine.runner.matmul.kernels  # int8 weights, next to the plain version's engine
    response = await mesh.stub.CreateCompletion(completion(model=TINY_INT8, skip_cache=True), metadata=mesh.auth)
    assert response.model == TINY_INT8 and response.choices[0].text and response.usage.prompt_tokens == 2


async def test_chat_stream_deltas(mesh):
    request = pb.StreamChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")],
                                             max_tokens=w.Int32Value(value=5), ignore_eos=True, skip_cache=True)
    chunks = [c async for c in mesh.stub.StreamChatCompletion(request, metadata=mesh.auth)]
    roles = [ch.delta.role for c in chunks for ch in c.choices]
    assert roles[0] == "assistant" and set(roles[1:]) <= {""}
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].usage.completion_tokens == 5


async def call_with_cache_header(method, request, metadata):
    call = method(request, metadata=metadata)
    response = await call
    return response, dict(await call.initial_metadata())["x-llmserve-cache"]


async def test_deterministic_request_is_a_cache_hit(mesh):
    request = completion(prompt="cache me", max_tokens=w.Int32Value(value=6))
    first, cache1 = await call_with_cache_header(mesh.stub.CreateCompletion, request, mesh.auth)
    second, cache2 = await call_with_cache_header(mesh.stub.CreateCompletion, request, mesh.auth)
    assert (cache1, cache2) == ("miss", "hit")
    assert second.choices == first.choices
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (first.usage.prompt_tokens,
                                                                           first.usage.completion_tokens)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens
    _, cache3 = await call_with_cache_header(
        mesh.stub.CreateCompletion, completion(prompt="cache me", max_tokens=w.Int32Value(value=6), skip_cache=True),
        mesh.auth)
    assert cache3 == "bypass"
    # A cached answer replays on the streaming RPC too.
    stream = mesh.stub.StreamCompletion(pb.StreamCompletionRequest.FromString(request.SerializeToString()),
                                        metadata=mesh.auth)
    text = "".join([ch.text async for c in stream for ch in c.choices])
    assert text == first.choices[0].text
    # Sampled requests without a seed are never cached.
    sampled = completion(prompt="cache me", temperature=w.FloatValue(value=0.9))
    _, cache4 = await call_with_cache_header(mesh.stub.CreateCompletion, sampled, mesh.auth)
    assert cache4 == "bypass"


async def test_embeddings(mesh):
    response = await mesh.stub.CreateEmbeddings(pb.CreateEmbeddingsRequest(
        model="embed", inputs=["a cat sat on the mat", "a kitten sat on a rug", "stock markets fell sharply"]),
        metadata=mesh.auth)
    assert response.model == EMBED and [d.index for d in response.data] == [0, 1, 2]
    vectors = [list(d.embedding) for d in response.data]
    assert all(len(v) == 384 for v in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 - unit vectors: dot is cosine
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert response.usage.prompt_tokens > 0


async def test_list_models(mesh):
    response = await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=mesh.auth)
    ids = [m.id for m in response.data]
    assert ids[:3] == ["embed", "orphan", "tiny"] and TINY in ids and EMBED in ids
    tiny = next(m for m in response.data if m.id == "tiny")
    assert tiny.kind == "generate" and [t.version for t in tiny.targets] == [TINY]


# ---- bad input: precise statuses, and the service keeps serving ----

BAD_COMPLETIONS = [
    (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(max_tokens=w.Int32Value(value=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens=0"),
    (dict(max_tokens=w.Int32Value(value=-3)), grpc.StatusCode.INVALID_ARGUMENT, ">= 1"),
    (dict(max_tokens=w.Int32Value(value=5000)), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    (dict(temperature=w.FloatValue(value=2.5)), grpc.StatusCode.INVALID_ARGUMENT, "[0, 2]"),
    (dict(temperature=w.FloatValue(value=-0.1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(top_p=w.FloatValue(value=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "(0, 1]"),
    (dict(top_p=w.FloatValue(value=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (dict(n=w.Int32Value(value=0)), grpc.StatusCode.INVALID_ARGUMENT, "n=0"),
    (dict(stop=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(priority=9), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    (dict(prompt="", prompts=["x"] * 20, n=w.Int32Value(value=16)), grpc.StatusCode.INVALID_ARGUMENT,
     "320 sequences"),
    (dict(prompt="", prompts=["x"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
    (dict(prompt="word " * 600), grpc.StatusCode.INVALID_ARGUMENT, "context length of 512"),
    (dict(model="embed"), grpc.StatusCode.INVALID_ARGUMENT, "embed model"),
    (dict(model="orphan"), grpc.StatusCode.UNAVAILABLE, "no worker serves"),
]


@pytest.mark.parametrize("fields, code, needle", BAD_COMPLETIONS)
async def test_bad_completion_gets_precise_status(mesh, fields, code, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(skip_cache=True, **fields), metadata=mesh.auth, timeout=10)
    assert err.value.code() == code
    assert needle in err.value.details()
    ok = await mesh.stub.CreateCompletion(completion(skip_cache=True), metadata=mesh.auth)  # still serving
    assert ok.choices


async def test_bad_chat_and_embeddings(mesh):
    cases = [
        (mesh.stub.CreateChatCompletion, pb.CreateChatCompletionRequest(model="tiny"), "messages"),
        (mesh.stub.CreateChatCompletion, pb.CreateChatCompletionRequest(
            model="tiny", messages=[pb.ChatMessage(role="robot", content="x")]), "role"),
        (mesh.stub.CreateEmbeddings, pb.CreateEmbeddingsRequest(model="embed"), "input"),
        (mesh.stub.CreateEmbeddings, pb.CreateEmbeddingsRequest(model="tiny", input="x"), "generate model"),
        (mesh.stub.CreateEmbeddings, pb.CreateEmbeddingsRequest(model="embed", input="x", encoding_format="int8"),
         "encoding_format"),
        (mesh.stub.CreateEmbeddings, pb.CreateEmbeddingsRequest(model="embed", input="long " * 400), "input[0]"),
    ]
    for method, request, needle in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request, metadata=mesh.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in err.value.details()


async def test_no_or_unknown_key_is_unauthenticated(mesh):
    for metadata in [(), (("authorization", "Bearer lls_wrong"),), (("authorization", "Basic abc"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.CreateCompletion(completion(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_model_version_without_worker_is_unavailable_fast(mesh):
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(model="tiny-llama-v2"), metadata=mesh.auth, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert loop.time() - started < 1.0


async def test_client_deadline_is_deadline_exceeded(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=400), ignore_eos=True,
                                                    skip_cache=True), metadata=mesh.auth, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_running(mesh, TINY, 0)


async def _wait_running(mesh, version, expected, timeout_s=5.0):
    engine = mesh.workers[0].models[version].engine
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while engine.load().num_running != expected:
        assert loop.time() < deadline, f"running={engine.load().num_running}, expected {expected}"
        await asyncio.sleep(0.02)


async def test_cancel_mid_stream_stops_the_sequence(mesh):
    request = pb.StreamCompletionRequest(model="tiny", prompt="go on", max_tokens=w.Int32Value(value=400),
                                         ignore_eos=True, skip_cache=True)
    call = mesh.stub.StreamCompletion(request, metadata=mesh.auth)
    async for chunk in call:
        if chunk.choices and chunk.choices[0].text:
            break
    await _wait_running(mesh, TINY, 1)
    call.cancel()
    await _wait_running(mesh, TINY, 0)


async def test_vanished_worker_fails_in_flight_requests_and_leaves_routing(mesh):
    worker = await mesh.add_worker(["tiny-llama-v2"])
    request = pb.StreamCompletionRequest(model="orphan", prompt="go on", max_tokens=w.Int32Value(value=400),
                                         ignore_eos=True, skip_cache=True)
    call = mesh.stub.StreamCompletion(request, metadata=mesh.auth, timeout=30)
    async for chunk in call:
        if chunk.choices and chunk.choices[0].text:
            break
    # The worker dies abruptly: no lease revoke, its streams just break.
    worker.registration._task.cancel()  # stop refreshing the lease, without revoking it
    await worker.service.server.stop(None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "went away" in err.value.details()
    assert loop.time() - started < 2.0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(model="orphan", skip_cache=True), metadata=mesh.auth, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Its lease expires and it leaves the membership for good.
    assert await mesh.scheduler.view.workers.wait_for(lambda s: worker.worker_id not in s, 10)
    for served in worker.models.values():
        await served.engine.stop()
    mesh.workers.remove(worker)
    await worker.client.close()


@pytest.mark.parametrize("outage", ["hung", "stopped"])
async def test_serving_continues_without_redis(mesh, redis_srv, outage):
    request = completion(prompt=f"redis is {outage}", max_tokens=w.Int32Value(value=4))
    if outage == "hung":
        redis_srv.pause()
    else:
        redis_srv.stop()
    try:
        for _ in range(2):  # neither read nor write of the cache can work: both are plain misses
            response, cache = await call_with_cache_header(mesh.stub.CreateCompletion, request, mesh.auth)
            assert response.choices and cache == "miss"
    finally:
        if outage == "hung":
            redis_srv.resume()
        else:
            redis_srv.start()
    # Redis back: the cache works again without restarting anything.
    first, cache1 = await call_with_cache_header(mesh.stub.CreateCompletion, request, mesh.auth)
    second, cache2 = await call_with_cache_header(mesh.stub.CreateCompletion, request, mesh.auth)
    assert (cache1, cache2) == ("miss", "hit") and first.choices == second.choices


async def _usage(mesh) -> dict:
    from llmserve.admin.v1 import tenants_pb2 as tpb
    await mesh.gateway.edge.usage.flush()
    assert await mesh.gateway.journal.replay()  # what a Redis outage of an earlier test left in the journal
    rows = (await mesh.tenants.GetUsage(tpb.GetUsageRequest(tenant="test-tenant"))).rows
    return next(({"requests": r.requests, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "cost_usd": r.cost_usd} for r in rows if r.model_version == TINY), {})


async def test_usage_is_counted_per_tenant_and_version(mesh):
    before = await _usage(mesh)
    response = await mesh.stub.CreateCompletion(completion(prompt="count me", skip_cache=True), metadata=mesh.auth)
    after = await _usage(mesh)
    assert after["requests"] == before.get("requests", 0) + 1
    assert after["prompt_tokens"] - before.get("prompt_tokens", 0) == response.usage.prompt_tokens
    assert after["completion_tokens"] - before.get("completion_tokens", 0) == response.usage.completion_tokens
    expected_cost = (response.usage.prompt_tokens * 0.1 + response.usage.completion_tokens * 0.2) / 1000
    assert after["cost_usd"] - before.get("cost_usd", 0) == pytest.approx(expected_cost, abs=2e-6)


async def test_new_and_revoked_keys_take_effect_within_a_second(mesh):
    from llmserve.common import etcd as etcd_mod
    from llmserve.common.state import keys
    from llmserve.common.state.store import Store
    client = etcd_mod.connect(mesh.config.etcd)
    try:
        api_keys = Store(client, mesh.config.etcd.prefix).api_keys
        key, record = await keys.create_api_key(api_keys, "test-tenant")
        metadata = (("authorization", f"Bearer {key}"),)
        assert await mesh.gateway.view.keys.wait_for(lambda s: record.key_hash in s, 1.0)
        assert (await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)).data
        await keys.revoke_api_key(api_keys, record.key_id)
        assert await mesh.gateway.view.keys.wait_for(lambda s: s[record.key_hash].revoked, 1.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stored = (await client.get(f"{mesh.config.etcd.prefix}/keys/{record.key_hash}".encode())).value.decode()
        assert key not in stored  # only the hash is stored
    finally:
        await client.close()


async def test_max_completion_tokens_and_stream_options(mesh):
    response = await mesh.stub.CreateCompletion(completion(max_tokens=None, max_completion_tokens=w.Int32Value(
        value=3), ignore_eos=True, skip_cache=True), metadata=mesh.auth)
    assert response.usage.completion_tokens == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(max_completion_tokens=w.Int32Value(value=3)), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "differ" in err.value.details()
    base = dict(model="tiny", prompt="x", max_tokens=w.Int32Value(value=2), skip_cache=True)
    without = [c async for c in mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        **base, stream_options=pb.StreamOptions(include_usage=False)), metadata=mesh.auth)]
    assert all(c.choices and not c.HasField("usage") for c in without)
    with_usage = [c async for c in mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        **base, stream_options=pb.StreamOptions(include_usage=True)), metadata=mesh.auth)]
    assert with_usage[-1].HasField("usage") and not with_usage[-1].choices


async def test_shared_prompt_prefix_is_served_from_the_workers_prefix_cache(mesh):
    prompt = "A long shared system prompt about the weather in many cities of the world. " * 4
    first = await mesh.stub.CreateCompletion(completion(prompt=prompt + "Paris?", skip_cache=True), metadata=mesh.auth)
    second = await mesh.stub.CreateCompletion(completion(prompt=prompt + "Rome?", skip_cache=True), metadata=mesh.auth)
    block = mesh.config.worker.block_size
    assert first.usage.prompt_tokens > 3 * block
    # Every full block of the shared prefix is reused: the second prefill only computes the tail.
    assert second.usage.prompt_tokens_details.cached_tokens >= 3 * block
    assert second.usage.prompt_tokens_details.cached_tokens % block == 0


async def test_prefix_cache_hits_count_only_for_the_tenant_that_computed_the_blocks(mesh):
    from llmserve.admin.v1 import tenants_pb2 as tpb
    await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name="other-tenant")))
    created = await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="other-tenant"))
    other = (("authorization", f"Bearer {created.key}"),)
    assert await mesh.gateway.view.tenants.wait_for(lambda s: "other-tenant" in s, 5)
    assert await mesh.gateway.view.keys.wait_for(lambda s: created.api_key.key_hash in s, 5)
    request = completion(prompt="A confidential memo about the merger of two large companies next spring. " * 4,
                         skip_cache=True)
    first = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    # Another tenant sending the same prompt computes it all: its usage does not reveal that the prompt was sent.
    intruder = await mesh.stub.CreateCompletion(request, metadata=other)
    repeat = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    intruder_repeat = await mesh.stub.CreateCompletion(request, metadata=other)
    block = mesh.config.worker.block_size
    assert first.usage.prompt_tokens == intruder.usage.prompt_tokens > 3 * block
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert intruder.usage.prompt_tokens_details.cached_tokens == 0
    # Each tenant's own repeat is served from its own blocks, with the same text.
    assert repeat.usage.prompt_tokens_details.cached_tokens >= 3 * block
    assert intruder_repeat.usage.prompt_tokens_details.cached_tokens >= 3 * block
    assert first.choices == intruder.choices == repeat.choices == intruder_repeat.choices


async def test_metrics_expose_latency_and_kv_cache(mesh):
    from prometheus_client import REGISTRY
    await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=4), ignore_eos=True, skip_cache=True),
                                     metadata=mesh.auth)
    mesh.workers[0]._export_metrics()
    sample = REGISTRY.get_sample_value
    assert sample("llmserve_gateway_inter_token_seconds_count", {"model_version": TINY}) >= 3
    assert sample("llmserve_gateway_time_to_first_token_seconds_count", {"model_version": TINY}) >= 1
    total = sum(sample("llmserve_worker_kv_cache_blocks", {"model_version": TINY, "state": s}) for s in
                ("used", "free"))
    assert total == mesh.workers[0].models[TINY].engine.stats().num_kv_blocks
