"""A/B statistics through the whole mesh: two gateway replicas serving one alias's split, their figures summed in
Redis and read back per arm and per version (GetExperimentStats), in Prometheus labels too; sticky arms by user
(the tenant when a request names none) that keep most users on their arm when the weights change."""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w
from prometheus_client import REGISTRY

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.common import experiments, tls
from llmserve.common.state.views import rendezvous_score
from llmserve.gateway.app import GatewayApp
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.mesh import generate_version, start_mesh

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def completion(user: str, max_tokens: int = 3) -> pb.CreateCompletionRequest:
    return pb.CreateCompletionRequest(model="ab", prompt=PROMPT, max_tokens=w.Int32Value(value=max_tokens),
                                      temperature=w.FloatValue(value=0.0), ignore_eos=True, skip_cache=True,
                                      user=user)


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    config = make_config()
    config.worker.num_kv_blocks = 64
    # A model load holds the GIL in bursts: on 2 loaded cores the 2 s test lease could lapse meanwhile, and a worker
    # whose lease lapses leaves routing, failing its requests (a crash's cost, not a model update's).
    config.worker.lease_ttl_s = 10
    source = f"file:{tiny_llama_dir}"
    mesh = await start_mesh(config, versions=[generate_version("ab-v1", source, context_length=512),
                                              generate_version("ab-v2", source, context_length=512)],
                            aliases={"ab": [("ab-v1", 1), ("ab-v2", 1)]}, worker_models=[["ab-v1", "ab-v2"]])
    yield mesh
    await mesh.stop()


async def test_two_gateway_replicas_sum_into_one_set_of_arm_statistics(mesh):
    second = GatewayApp(mesh.config)
    port = await second.start()
    channel = tls.aio_channel(f"127.0.0.1:{port}", mesh.config.security, "client")
    stubs = [mesh.stub, inference_pb2_grpc.InferenceServiceStub(channel)]
    try:
        seen: collections.Counter[str] = collections.Counter()
        tokens = collections.Counter()

        async def one(i: int) -> None:
            reply = await stubs[i % 2].CreateCompletion(completion(f"user-{i}"), metadata=mesh.auth)
            seen[reply.model] += 1
            tokens["prompt"] += reply.usage.prompt_tokens
            tokens["completion"] += reply.usage.completion_tokens

        await asyncio.gather(*(one(i) for i in range(40)))
        bad = pb.CreateCompletionRequest(model="ab", prompt=PROMPT, max_tokens=w.Int32Value(value=100000),
                                         user="user-0")
        with pytest.raises(grpc.aio.AioRpcError):
            await stubs[1].CreateCompletion(bad, metadata=mesh.auth)
        await asyncio.sleep(0.6)  # both replicas flush (every 0.25 s)
        reply = await mesh.admin.GetExperimentStats(rpb.GetExperimentStatsRequest(alias="ab"))
        arms = {a.version: a for a in reply.arms}
        assert set(arms) == {"ab-v1", "ab-v2"} and "histogram" in reply.method
        assert seen["ab-v1"] > 0 and seen["ab-v2"] > 0  # 40 users spread over a 1:1 split
        failed_arm = next(v for v, a in arms.items() if a.errors)
        for version, arm in arms.items():
            assert arm.weight == 1 and arm.alias == "ab"
            assert arm.requests == seen[version] + (version == failed_arm)
            assert arm.latency.count == arm.requests and arm.ttft.count == seen[version]
            assert 0 < arm.ttft.p50_s <= arm.ttft.p95_s <= arm.ttft.p99_s
            assert arm.ttft.p50_s <= arm.latency.p99_s
            assert arm.server_errors == 0 and arm.cache_hits == 0
        assert dict(arms[failed_arm].errors) == {"INVALID_ARGUMENT": 1}
        assert sum(a.prompt_tokens for a in arms.values()) == tokens["prompt"]
        assert sum(a.completion_tokens for a in arms.values()) == tokens["completion"] == 120
        # 0.1 $ / 1K prompt tokens and 0.2 $ / 1K completion tokens (tests/helpers/mesh.generate_version)
        cost = sum(a.cost_usd for a in arms.values())
        assert cost == pytest.approx(tokens["prompt"] * 1e-4 + tokens["completion"] * 2e-4, abs=1e-5)
        version = await mesh.admin.GetExperimentStats(rpb.GetExperimentStatsRequest(version="ab-v1"))
        assert version.arms[0].requests == arms["ab-v1"].requests
        sample = REGISTRY.get_sample_value("llmserve_gateway_arm_requests_total",
                                           {"alias": "ab", "model_version": "ab-v1", "code": "OK"})
        assert sample is not None and sample >= 1  # both replicas run in this process: it counts both
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.GetExperimentStats(rpb.GetExperimentStatsRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.GetExperimentStats(rpb.GetExperimentStatsRequest(alias="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await second.stop(0)


async def test_a_user_stays_on_its_arm_and_the_tenant_stands_in_for_a_missing_user(mesh):
    picks = set()
    for _ in range(6):
        picks.add((await mesh.stub.CreateCompletion(completion("alice"), metadata=mesh.auth)).model)
    assert len(picks) == 1
    anonymous = set()
    for _ in range(6):
        anonymous.add((await mesh.stub.CreateCompletion(completion(""), metadata=mesh.auth)).model)
    assert len(anonymous) == 1  # one tenant, no user: one arm


def arm(users, weights: dict[str, int]) -> dict[str, str]:
    return {u: max(weights, key=lambda v: rendezvous_score("ab", v, u, weights[v])) for u in users}


def test_weights_change_moves_only_the_users_that_must_move():
    users = [f"u{i}" for i in range(20000)]
    before = arm(users, {"stable": 95, "canary": 5})
    after = arm(users, {"stable": 75, "canary": 25})
    share = collections.Counter(after.values())["canary"] / len(users)
    assert share == pytest.approx(0.25, abs=0.015)
    assert all(after[u] == "canary" for u in users if before[u] == "canary")  # the canary keeps its users
    moved = sum(before[u] != after[u] for u in users) / len(users)
    assert moved == pytest.approx(0.20, abs=0.015)  # the minimum: 25% - 5%
    three = arm(users, {"a": 1, "b": 1, "c": 1})
    four = arm(users, {"a": 1, "b": 1, "c": 1, "d": 1})
    assert all(four[u] in (three[u], "d") for u in users)  # a new arm only takes users; none swap between a/b/c


def test_quantiles_interpolate_inside_the_summed_buckets():
    counts = [0] * len(experiments.BOUNDS)
    counts[experiments.bucket(0.04)] = 50  # (0.03, 0.05]
    counts[experiments.bucket(0.12)] = 50  # (0.1, 0.15]
    assert experiments.quantile(0.5, counts) == pytest.approx(0.05)
    assert experiments.quantile(0.95, counts) == pytest.approx(0.1 + 0.05 * 0.9)
    assert experiments.quantile(0.5, [0] * len(counts)) == 0.0
