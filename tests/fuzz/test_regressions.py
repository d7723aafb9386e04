"""Defects the fuzzers (tests/fuzz/test_grpc.py, tests/fuzz/test_rest.py) found, each kept as its failing example
against the real service, beside a test of the whole class the fix covers."""

from __future__ import annotations

import types

import grpc
import pytest

from llmserve.admin.v1 import admin_keys_pb2 as apb
from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.clients.admin import admin_key_stub, registry_stub, tenant_stub
from llmserve.common import etcd as etcd_mod
from llmserve.common.errors import invalid_argument
from llmserve.common.server import Service
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from llmserve.registry.app import RegistryApp


@pytest.fixture(scope="module")
async def admin(make_config):
    """A real registry (etcd, Redis) and an admin key for it."""
    config = make_config()
    client = etcd_mod.connect(config.etcd)
    admin_key, _ = await keys.create_admin_key(Store(client, config.etcd.prefix).admin_keys, "tests")
    await client.close()
    app = RegistryApp(config)
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield types.SimpleNamespace(channel=channel, admin_key=admin_key)
    await channel.close()
    await app.stop(0)


@pytest.fixture(scope="module")
def registry(admin):
    """The RegistryService with the admin key."""
    return registry_stub(admin.channel, admin.admin_key)


# ---- a status message quoting a huge value must still reach the caller ----
# Found by fuzzing CreateModelVersion: a 100,000-character version id was quoted whole in the INVALID_ARGUMENT
# message; grpc carries the message in a header, the client refuses headers over 16 KiB, and the caller read
# RESOURCE_EXHAUSTED "Stream removed (received metadata size exceeds hard limit)" instead of what to fix.

async def test_huge_version_id_gets_invalid_argument_naming_the_rule(registry):
    version = rpb.ModelVersion(version="word " * 20_000, family="tiny", kind=rpb.MODEL_KIND_GENERATE,
                               weights_source="file:/x", context_length=64)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=version), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith("model_version.version='word word") and "lowercase letters" in details
    assert len(details) <= 4096


class Echo(inference_pb2_grpc.InferenceServiceServicer):
    """Refuses every chat request with a message that quotes the model name whole."""

    async def CreateChatCompletion(self, request, context):
        raise invalid_argument(f"model={request.model!r} is unknown: pick one that ListModels shows")


@pytest.mark.parametrize("model", ["m" * 100_000, "\U0001f916" * 20_000, "\u0645" * 50_000])
async def test_any_status_message_is_cut_to_fit_and_keeps_its_advice(model):
    service = Service("test", "127.0.0.1", 0, ["llmserve.inference.v1.InferenceService"])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Echo(), service.server)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await inference_pb2_grpc.InferenceServiceStub(channel).CreateChatCompletion(
                    pb.CreateChatCompletionRequest(model=model), timeout=10)
    finally:
        await service.stop(0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith("model='" + model[:10]) and details.endswith("pick one that ListModels shows")
    assert "characters cut" in details and len(details.encode()) < 4096


# ---- enum values no enum defines are refused before a handler reads them ----
# Found by fuzzing UpdateModelVersionState: state=68 decodes (proto3 enums are open), the registry stored it and
# then failed naming it in its log (ModelState.Name(68): ValueError), an INTERNAL error after the write.

async def test_unknown_model_state_is_invalid_argument_and_changes_nothing(registry):
    await registry.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=rpb.ModelVersion(
        version="enum-v1", family="tiny", kind=rpb.MODEL_KIND_GENERATE, weights_source="file:/x", context_length=64)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.UpdateModelVersionState(rpb.UpdateModelVersionStateRequest(version="enum-v1", state=68))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("state=68 is not a value of ModelState: use one of MODEL_STATE_ACTIVE, "
                                   "MODEL_STATE_DISABLED")
    stored = await registry.GetModelVersion(rpb.GetModelVersionRequest(version="enum-v1"))
    assert stored.model_version.state == rpb.MODEL_STATE_ACTIVE


async def test_unknown_enum_anywhere_in_a_request_is_refused_before_it_is_stored(registry):
    version = rpb.ModelVersion(version="enum-v2", family="tiny", kind=5, weights_source="file:/x", context_length=64)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=version))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("model_version.kind=5 is not a value of ModelKind: use one of ")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.GetModelVersion(rpb.GetModelVersionRequest(version="enum-v2"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_undefined_enum_finds_enums_at_any_depth():
    from llmserve.common.enums import undefined_enum

    assert undefined_enum(rpb.UpdateModelVersionStateRequest(state=rpb.MODEL_STATE_DISABLED)) is None
    assert undefined_enum(pb.CreateChatCompletionRequest(messages=[pb.ChatMessage(role="user")] * 3)) is None
    assert undefined_enum(pb.CreateCompletionRequest(priority=-1)).startswith("priority=-1 is not a value of Priority")
    assert undefined_enum(tpb.ListTenantsResponse(tenants=[tpb.Tenant(), tpb.Tenant(budget_period=9)])).startswith(
        "tenants[1].budget_period=9 ")


# ---- admin requests too large for etcd are refused before they are parsed ----
# Found by fuzzing AdminKeyService.CreateAdminKey: a 5 MiB description reached etcd, which refuses requests over
# its limit (1.5 MiB by default; aetcd's channel 2 MiB): INTERNAL, after about 30 s. The class: every admin
# request, whatever field holds the bytes (descriptions, allowed_models, labels, alias targets).

@pytest.mark.parametrize("method, request_", [
    ("CreateModelVersion", rpb.CreateModelVersionRequest(model_version=rpb.ModelVersion(
        version="big-v1", family="tiny", kind=rpb.MODEL_KIND_GENERATE, weights_source="file:/x", context_length=64,
        labels={f"k{i}": "v" * 100 for i in range(4_000)}))),
    ("CreateTenant", tpb.CreateTenantRequest(tenant=tpb.Tenant(name="big", allowed_models=["m" * 100] * 4_000))),
], ids=["version labels", "tenant allowed_models"])
async def test_admin_request_over_the_limit_is_invalid_argument_at_once(admin, method, request_):
    stubs = {"CreateModelVersion": registry_stub, "CreateTenant": tenant_stub}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stubs[method](admin.channel, admin.admin_key), method)(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes are accepted" in err.value.details()


async def test_huge_descriptions_are_invalid_argument_at_once(admin):
    admin_keys = admin_key_stub(admin.channel, admin.admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the fuzzer's example: past 4x the limit grpc refuses it
        await admin_keys.CreateAdminKey(apb.CreateAdminKeyRequest(description="d" * (5 << 20)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    tenants = tenant_stub(admin.channel, admin.admin_key)
    await tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name="big-descriptions")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="big-descriptions", description="d" * 500_000),
                                   timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- a prompt that tokenizes to nothing is the caller's to fix ----
# Found by the REST fuzzer: the prompt "\x04" (SmolLM2's tokenizer keeps none of U+0004, U+0006, U+0013, U+0014,
# U+0016, U+001D) reached the engine with no tokens, which refused it: INTERNAL "generation failed".

@pytest.mark.parametrize("prompt", ["\x04", "\x06\x13\x14\x16\x1d"])
async def test_prompt_without_tokens_is_invalid_argument(fz, prompt):
    from google.protobuf import wrappers_pb2 as w

    for key in (fz.mesh.api_key, fz.limited_key):  # the limited tenant's prompt is counted at the gateway first
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fz.mesh.stub.CreateCompletion(pb.CreateCompletionRequest(
                model="tiny", prompt=prompt, max_tokens=w.Int32Value(value=2), skip_cache=True),
                metadata=(("authorization", f"Bearer {key}"),), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("prompt has no tokens for model 'tiny-llama-v1'")


# ---- what the registry accepts, etcd can store ----
# Found by fuzzing CreateAdminKey longer: a 600 KB description of Arabic letters was under the 1 MiB request cap,
# but its JSON record ("\u0645" per letter) was over etcd's 1.5 MiB: INTERNAL "etcdserver: request is too large".

async def test_admin_records_of_any_characters_under_the_cap_are_stored(admin):
    from llmserve.registry.app import MAX_ADMIN_REQUEST_BYTES

    admin_keys = admin_key_stub(admin.channel, admin.admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the fuzzer's example
        await admin_keys.CreateAdminKey(apb.CreateAdminKeyRequest(description="\u0645" * 300_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Key descriptions are short by rule (256 characters); a model version's labels are the admin plane's large
    # free text. The most expensive characters to store: each a 6-byte JSON escape, or 12 bytes for 4 of UTF-8.
    registry = registry_stub(admin.channel, admin.admin_key)
    for i, text in enumerate(("\x00" * (MAX_ADMIN_REQUEST_BYTES - 300),
                              "\U0001f916" * (MAX_ADMIN_REQUEST_BYTES // 4 - 300))):
        version = rpb.ModelVersion(version=f"escapes-v{i}", family="escapes", kind=rpb.MODEL_KIND_GENERATE,
                                   weights_source="file:/nowhere", context_length=16, labels={"note": text})
        created = await registry.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=version), timeout=30)
        assert created.model_version.labels["note"] == text
        await registry.DeleteModelVersion(rpb.DeleteModelVersionRequest(version=version.version), timeout=30)
