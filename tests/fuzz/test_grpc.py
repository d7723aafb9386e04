"""Property-based fuzzing of every public RPC against the real mesh (tiny Llama + MiniLM, real etcd and Redis):
the gateway's InferenceService and the registry's admin services (every service of llmserve.inference.v1 and
llmserve.admin.v1, found in the generated code).

Hypothesis builds each request from the method's descriptor (tests/helpers/fuzz.py): hostile numbers (NaN, inf,
1e-40, integer extremes, unknown enum values), strings (astral, right-to-left, NUL, chat-template tokens, megabytes),
empty and enormous lists, and bytes that are not a message of the method at all. The property: every answer is a
success or a precise status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...: tests/helpers/fuzz.PRECISE) with
a message, never INTERNAL, UNKNOWN, a hang or a crash; and after each method's run the mesh still serves a normal
request.

`make test` runs a few dozen examples per method (seconds). Longer, by hand:

    LLMSERVE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/fuzz/test_grpc.py -x -q
    LLMSERVE_FUZZ_SEED=7 ...   # other examples than the derandomized default ones

A failure prints the shrunk example (method, metadata, request bytes); keep it as a regression test beside the fix
(tests/fuzz/test_regressions.py). `pytest -s` prints, per method, how many answers had each status and the slowest
calls; LLMSERVE_FUZZ_VERBOSE=1 adds the distinct messages.
The admin services are fuzzed after the gateway's: they leave odd but valid versions, aliases and tenants behind,
and the last test checks that the gateway still serves with them in its view.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib
import os
import pkgutil
import time

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import assume, given, seed
from hypothesis import strategies as st

import llmserve.admin.v1
import llmserve.inference.v1
from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.inference.v1 import inference_pb2 as pb
from tests.fuzz.conftest import EMBED, FUZZ_ALIASES, FUZZ_TENANTS, FUZZ_VERSIONS, PROTECTED, TINY, Fuzzed, bearer
from tests.helpers import fuzz


def public_services() -> list[d.ServiceDescriptor]:
    """Every service of the public packages (the gateway's API and the admin plane), found in the generated code:
    a service added there is fuzzed without a new test."""
    found = {}
    for package in (llmserve.inference.v1, llmserve.admin.v1):
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                descriptor = importlib.import_module(f"{package.__name__}.{module.name}").DESCRIPTOR
                found.update({s.full_name: s for s in descriptor.services_by_name.values()})
    # The gateway's first: admin fuzzing changes the registry the gateway reads.
    return sorted(found.values(), key=lambda s: (s.file.package != "llmserve.inference.v1", s.full_name))


SERVICES = public_services()
METHODS = [m for s in SERVICES for m in s.methods]
ALL_REQUESTS = [m.input_type for m in METHODS]
EXAMPLES = {"llmserve.inference.v1": 20, "llmserve.admin.v1": 25}
CALL_TIMEOUT_S = 60  # a hang is a failure (DEADLINE_EXCEEDED is not in PRECISE)
# Details of a status grpc made up because the call broke, not because a service answered.
TRANSPORT_FAILURES = ("Stream removed", "Socket closed", "Connection reset", "GOAWAY", "failed to connect",
                      "Broken pipe", "Received RST_STREAM")


BAD_AUTH = [(), (("authorization", "Bearer lls_not_a_key"),), (("authorization", "Basic YWxhZGRpbjpvcGVu"),),
            (("authorization", "Bearer"),), (("authorization", "bearer  x y"),),
            (("authorization", "Bearer a"), ("authorization", "Bearer b"))]


def inference_auth(f: Fuzzed) -> st.SearchStrategy:
    good, limited = bearer(f.mesh.api_key), bearer(f.limited_key)
    return st.one_of(st.just(good), st.just(good), st.just(limited), st.just(limited), st.sampled_from(BAD_AUTH))


def admin_auth(f: Fuzzed) -> st.SearchStrategy:
    admin = bearer(f.mesh.admin_key)
    return st.one_of(st.just(admin), st.just(admin), st.just(admin), st.just(bearer(f.mesh.api_key)),
                     st.sampled_from(BAD_AUTH))


def wrapped(values: list[int]) -> st.SearchStrategy:
    return st.sampled_from(values).map(lambda v: w.Int32Value(value=v))


TEXTS = ["Hello there", "Hi", "a cat sat on the mat", "\U0001f916 \u202eolleh", "x" * 200]
# Acceptable but unusual text: NUL, astral, right-to-left, chat-template tokens, any printable or not.
TEXT = st.one_of(st.sampled_from(TEXTS), st.sampled_from([s for s in fuzz.SPECIAL_STRINGS if s]),
                 st.text(min_size=1, max_size=30))
INFERENCE_OVERRIDES = {
    "model": st.sampled_from(["tiny", TINY, "embed", EMBED, "TINY", "tiny "]),
    "prompt": st.sampled_from(TEXTS), "prompts": st.sampled_from(TEXTS), "input": st.sampled_from(TEXTS),
    "inputs": st.sampled_from(TEXTS), "content": st.sampled_from(TEXTS),
    "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "User"]),
    "max_tokens": wrapped([1, 4, 8, 63, 64]), "max_completion_tokens": wrapped([1, 4, 8]),
    "n": wrapped([1, 2, 16, 17]), "stop": st.sampled_from(["\n", ".", " the", "<|im_end|>"]),
    "encoding_format": st.sampled_from(["", "float", "base64"]),
}


def f32(values: list[float]) -> st.SearchStrategy:
    return st.sampled_from(values).map(lambda v: w.FloatValue(value=v))


# Valid values of the generation fields, the extremes included (a tiny temperature is greedy, any int64 seeds).
GENERATION = {
    "max_tokens": wrapped([1, 2, 5, 8]), "temperature": f32([0.0, 0.7, 1.0, 2.0, 1e-40, 1e-30, 1e-7, 1.4e-45]),
    "top_p": f32([1.0, 0.9, 0.5, 1e-30, 1.4e-45]), "top_k": st.sampled_from([0, 1, 5, 49151, 49152, 2 ** 31 - 1]),
    "seed": st.sampled_from([0, 1, -1, 2 ** 63 - 1, -(2 ** 63)]).map(lambda v: w.Int64Value(value=v)),
    "stop": st.lists(st.sampled_from(["\n", ".", " the", "<|im_end|>", "\x00", "\U0001f916", "x" * 256]),
                     min_size=1, max_size=4),
    "n": wrapped([1, 2, 3]), "user": TEXT, "priority": st.sampled_from(list(pb.Priority.values())),
    "skip_cache": st.booleans(), "ignore_eos": st.booleans(),
}
STREAM = {"stream_options": st.builds(pb.StreamOptions, include_usage=st.booleans())}
MESSAGES = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]), content=TEXT),
                    min_size=1, max_size=4)
GENERATE_MODEL = st.sampled_from(["tiny", TINY])
EMBED_MODEL = st.sampled_from(["embed", EMBED])
NAME = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
TENANT_NAME = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
DAYS = st.sampled_from(["2026-01-01", "2026-12-31", "9999-12-31", "0001-01-01", "2028-02-29"])
INT32_EDGES = st.sampled_from([0, 1, 64, 2 ** 31 - 1])


def close_requests(f: Fuzzed, descriptor: d.Descriptor) -> st.SearchStrategy:
    """Requests of `descriptor` a careful client could send, a mutation or two away (fuzz.near)."""
    near, o = fuzz.near, INFERENCE_OVERRIDES
    if descriptor.containing_type is None and descriptor.file.package == "llmserve.inference.v1":
        name = descriptor.name
        generation = {**GENERATION, **(STREAM if name.startswith("Stream") else {})}
        if "Completion" in name and "Chat" not in name:
            one = near(descriptor, {"model": GENERATE_MODEL, "prompt": TEXT, **generation}, ["model", "prompt"], o)
            many = near(descriptor, {"model": GENERATE_MODEL, "prompts": st.lists(TEXT, min_size=1, max_size=4),
                                     **generation}, ["model", "prompts"], o)
            return st.one_of(one, many)
        if "Chat" in name:
            return near(descriptor, {"model": GENERATE_MODEL, "messages": MESSAGES, **generation},
                        ["model", "messages"], o)
        if name == "CreateEmbeddingsRequest":
            common = {"model": EMBED_MODEL, "encoding_format": st.sampled_from(["", "float"]), "user": TEXT,
                      "priority": GENERATION["priority"], "skip_cache": st.booleans()}
            return st.one_of(near(descriptor, {**common, "input": TEXT}, ["model", "input"], o),
                             near(descriptor, {**common, "inputs": st.lists(TEXT, min_size=1, max_size=8)},
                                  ["model", "inputs"], o))
        return near(descriptor, {}, (), o)
    o = admin_overrides(f)
    version = st.one_of(st.sampled_from([*FUZZ_VERSIONS, TINY, EMBED, "fuzz-new"]), NAME)
    model_version = near(rpb.ModelVersion.DESCRIPTOR, {
        "version": version, "family": NAME, "kind": st.sampled_from([rpb.MODEL_KIND_GENERATE, rpb.MODEL_KIND_EMBED]),
        "engine": st.sampled_from(["", "torch", "tensorrt_llm"]), "weights_source": o["weights_source"],
        "context_length": st.sampled_from([1, 64, 2 ** 31 - 1]),
        "price_per_1k_prompt_tokens": st.sampled_from([0.0, 0.1, 5e-324, 1e300]),
        "price_per_1k_completion_tokens": st.sampled_from([0.0, 0.2, 1e-9, 1e308]),
        "state": st.sampled_from([0, rpb.MODEL_STATE_ACTIVE, rpb.MODEL_STATE_DISABLED]),
        "max_batch_size": INT32_EDGES, "max_wait_ms": INT32_EDGES,
        "labels": st.dictionaries(TEXT, TEXT, max_size=3)}, ["version", "family", "kind", "weights_source",
                                                              "context_length"], o, max_mutations=1)
    alias = near(rpb.Alias.DESCRIPTOR, {
        "name": st.one_of(st.sampled_from([*FUZZ_ALIASES, "fuzz-new-alias"]), NAME),
        "targets": st.lists(st.builds(rpb.TrafficSplit, version=version,
                                      weight=st.sampled_from([1, 2, 2 ** 32 - 1])), min_size=1, max_size=3)},
        ["name", "targets"], o, max_mutations=1)
    tenant = near(tpb.Tenant.DESCRIPTOR, {
        "name": st.one_of(st.sampled_from([*FUZZ_TENANTS, "fuzz-new"]), TENANT_NAME),
        "allowed_models": st.lists(st.sampled_from(["tiny*", "*", "[", "fuzz-?", "\U0001f916*"]), max_size=3),
        "max_priority": st.sampled_from(list(pb.Priority.values())),
        "requests_per_minute": INT32_EDGES, "tokens_per_minute": INT32_EDGES,
        "budget_usd": st.sampled_from([0.0, 1e-9, 25.0, 1e308]),
        "budget_period": st.sampled_from(list(tpb.BudgetPeriod.values()))}, ["name"], o, max_mutations=1)
    tenant_name = st.sampled_from([*FUZZ_TENANTS, "test-tenant", "fuzz-limited", "nobody"])
    key_id = st.sampled_from([*f.victim_key_ids, "key_000000000000"])
    sane = {
        "CreateModelVersionRequest": ({"model_version": model_version, "allow_existing": st.booleans()},
                                      ["model_version"]),
        "GetModelVersionRequest": ({"version": version}, ["version"]),
        "ListModelVersionsRequest": ({"family": NAME}, []),
        "UpdateModelVersionStateRequest": ({"version": version, "state": st.sampled_from(
            [rpb.MODEL_STATE_ACTIVE, rpb.MODEL_STATE_DISABLED])}, ["version", "state"]),
        "DeleteModelVersionRequest": ({"version": version}, ["version"]),
        "SetAliasRequest": ({"alias": alias}, ["alias"]),
        "GetAliasRequest": ({"name": alias.map(lambda a: a.name)}, ["name"]),
        "DeleteAliasRequest": ({"name": alias.map(lambda a: a.name)}, ["name"]),
        "CreateTenantRequest": ({"tenant": tenant}, ["tenant"]),
        "UpdateTenantRequest": ({"tenant": tenant}, ["tenant"]),
        "GetTenantRequest": ({"name": tenant_name}, ["name"]),
        "CreateApiKeyRequest": ({"tenant": tenant_name, "description": TEXT, "requests_per_minute": INT32_EDGES,
                                 "tokens_per_minute": INT32_EDGES}, ["tenant"]),
        "ListApiKeysRequest": ({"tenant": tenant_name}, []),
        "RevokeApiKeyRequest": ({"key_id": key_id}, ["key_id"]),
        "RotateApiKeyRequest": ({"key_id": key_id}, ["key_id"]),
        "GetUsageRequest": ({"tenant": tenant_name, "start_day": DAYS, "end_day": DAYS}, ["tenant"]),
    }
    fields, required = sane.get(descriptor.name, ({}, []))
    return near(descriptor, fields, required, o)


def admin_overrides(f: Fuzzed) -> dict:
    return {
        "version": st.sampled_from([*FUZZ_VERSIONS, TINY, EMBED, "fuzz-new"]), "family": st.sampled_from(["tiny"]),
        "name": st.sampled_from([*FUZZ_ALIASES, *FUZZ_TENANTS, "tiny", "test-tenant", "fuzz-new"]),
        "tenant": st.sampled_from([*FUZZ_TENANTS, "test-tenant", "fuzz-limited", "nobody"]),
        "key_id": st.sampled_from([*f.victim_key_ids, "key_000000000000"]),
        "weights_source": st.sampled_from(["file:/nonexistent", "pkg:nope/x", "/abs/path", "file:"]),
        "engine": st.sampled_from(["", "torch", "tensorrt_llm"]),
        "allowed_models": st.sampled_from(["tiny*", "[", "**", "?" * 100]),
        "start_day": st.sampled_from(["2026-01-01", "9999-12-31", "0001-01-01", "2026-W01", "20260101", "2026-02-30"]),
        "end_day": st.sampled_from(["2026-01-31", "9999-12-31", "0001-01-01", "2026-13-01"]),
        "weight": st.sampled_from([1, 2, 100]), "context_length": st.sampled_from([1, 64, 128]),
    }


MUTATING = ("Update", "Delete", "Set", "Revoke", "Rotate")  # method name prefixes


def touches_protected(f: Fuzzed, method: d.MethodDescriptor, payload: bytes) -> bool:
    """Whether a mutating admin request names something the final normal requests need (the admin key too)."""
    if not method.name.startswith(MUTATING):
        return False
    try:
        request = message_factory.GetMessageClass(method.input_type).FromString(payload)
    except Exception:
        return False  # not decodable: the registry refuses it
    protected = PROTECTED | {f.admin_key_id}
    if method.name == "SetAlias":  # an alias may route to a protected version; it must not replace one
        return request.alias.name in protected
    return any(s in protected for s in fuzz.all_strings(request))


@dataclasses.dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list


async def call(channel: grpc.aio.Channel, method: d.MethodDescriptor, payload: bytes, metadata) -> Answer:
    path = f"/{method.containing_service.full_name}/{method.name}"
    parse = message_factory.GetMessageClass(method.output_type).FromString
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
            responses = [parse(r) async for r in stream]
        else:
            responses = [parse(await channel.unary_unary(path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S))]
    except grpc.aio.AioRpcError as err:
        return Answer(err.code(), err.details() or "", [])
    return Answer(grpc.StatusCode.OK, "", responses)


def check(answer: Answer, method: d.MethodDescriptor, payload: bytes, metadata) -> None:
    where = f"{method.full_name} with metadata {metadata!r} and request {payload[:300]!r} ({len(payload)} bytes)"
    assert answer.code in fuzz.PRECISE, f"{answer.code.name} ({answer.details!r}) for {where}"
    assert not any(m in answer.details for m in TRANSPORT_FAILURES), f"{answer.details!r} for {where}"
    if answer.code != grpc.StatusCode.OK:
        assert answer.details.strip(), f"{answer.code.name} without a message for {where}"
        assert "Traceback" not in answer.details, answer.details


def run_fuzz(f: Fuzzed, channel: grpc.aio.Channel, method: d.MethodDescriptor, requests: st.SearchStrategy,
             auth: st.SearchStrategy, examples: int) -> None:
    """Runs hypothesis in this (worker) thread; each call runs on the mesh's event loop. Prints how many answers
    had each status (pytest -s shows it): a run where nothing succeeds tests only the validation."""
    seen: collections.Counter[str] = collections.Counter()
    slowest: list = []
    details: dict[str, set[str]] = {}

    @fuzz.fuzz_settings(examples)
    @given(payload=requests, metadata=auth)
    def prop(payload: bytes, metadata) -> None:
        assume(not touches_protected(f, method, payload))
        started = time.monotonic()
        answer = asyncio.run_coroutine_threadsafe(call(channel, method, payload, metadata), f.loop).result(
            CALL_TIMEOUT_S + 30)
        seen[answer.code.name] += 1
        details.setdefault(answer.code.name, set()).add(answer.details[:90])
        slowest.append((time.monotonic() - started, answer.code.name, len(payload), payload[:80]))
        check(answer, method, payload, metadata)

    if fuzz.fuzz_seed() is not None:
        prop = seed(fuzz.fuzz_seed())(prop)
    started = time.monotonic()
    try:
        prop()
    finally:
        print(f"fuzzed {method.full_name} in {time.monotonic() - started:.1f} s ({sum(t[0] for t in slowest):.1f} s "
              f"in calls): {dict(seen.most_common())}; slowest: {[t[:3] for t in sorted(slowest)[-3:]]}")
        if os.environ.get("LLMSERVE_FUZZ_VERBOSE"):
            print("\n".join(f"  {code}: {d!r}" for code, ds in details.items() for d in sorted(ds)))


async def assert_mesh_serves(f: Fuzzed) -> None:
    mesh = f.mesh
    health = await health_pb2_grpc.HealthStub(mesh.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for key in (mesh.api_key, f.limited_key):
        done = await mesh.stub.CreateCompletion(pb.CreateCompletionRequest(
            model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=4), temperature=w.FloatValue(value=0),
            skip_cache=True), metadata=bearer(key), timeout=30)
        assert done.choices and done.usage.completion_tokens >= 1
    embedded = await mesh.stub.CreateEmbeddings(pb.CreateEmbeddingsRequest(model="embed", input="a cat"),
                                                metadata=mesh.auth, timeout=30)
    assert len(embedded.data[0].embedding) == 384
    versions = await mesh.admin.ListModelVersions(rpb.ListModelVersionsRequest(), timeout=10)
    assert {TINY, EMBED} <= {v.version for v in versions.model_versions}


def server_for(f: Fuzzed, service: d.ServiceDescriptor) -> grpc.aio.Channel:
    if service.full_name in f.mesh.gateway.service._service_names:
        return f.mesh.channel
    assert service.full_name in f.mesh.registry.service._service_names, f"nobody serves {service.full_name}"
    return f.admin_channel


def test_every_public_rpc_is_fuzzed():
    """The parametrization below comes from the generated code: a new public RPC is fuzzed without a new test."""
    names = {m.full_name for m in METHODS}
    assert {"llmserve.inference.v1.InferenceService.StreamChatCompletion",
            "llmserve.admin.v1.RegistryService.SetAlias", "llmserve.admin.v1.TenantService.GetUsage"} <= names
    assert len(names) >= 6 + 9 + 9


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
async def test_rpc_answers_precisely(fz, method):
    service = method.containing_service
    is_inference = service.file.package == "llmserve.inference.v1"
    overrides = INFERENCE_OVERRIDES if is_inference else admin_overrides(fz)
    requests = fuzz.requests(method.input_type, close_requests(fz, method.input_type), overrides, ALL_REQUESTS)
    await asyncio.to_thread(run_fuzz, fz, server_for(fz, service), method, requests,
                            inference_auth(fz) if is_inference else admin_auth(fz), EXAMPLES[service.file.package])
    await assert_mesh_serves(fz)


async def test_gateway_serves_with_what_admin_fuzzing_left_in_the_registry(fz):
    """Every version and alias the admin fuzzing registered is in the gateway's view now: naming each gets a
    precise answer (UNAVAILABLE too: no worker serves them), and ListModels lists them."""
    mesh = fz.mesh
    await asyncio.sleep(0.5)  # the gateway's watch catches up
    listed = await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=mesh.auth, timeout=10)
    names = [m.id for m in listed.data]
    assert {"tiny", TINY, "embed", EMBED} <= set(names)
    allowed = fuzz.PRECISE | {grpc.StatusCode.UNAVAILABLE}
    for name in names:
        for method, request in ((mesh.stub.CreateCompletion, pb.CreateCompletionRequest(
                model=name, prompt="Hi", max_tokens=w.Int32Value(value=2))),
                                (mesh.stub.CreateEmbeddings, pb.CreateEmbeddingsRequest(model=name, input="Hi"))):
            try:
                await method(request, metadata=mesh.auth, timeout=30)
            except grpc.aio.AioRpcError as err:
                assert err.code() in allowed, f"{err.code().name} ({err.details()!r}) for model {name!r}"
    await assert_mesh_serves(fz)
