import grpc
import pytest

from llmserve.admin.v1 import registry_pb2 as pb
from llmserve.admin.v1 import registry_pb2_grpc
from llmserve.clients.admin import registry_stub
from llmserve.common import etcd as etcd_mod
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.common.state.views import RegistryView
from llmserve.registry.app import RegistryApp


async def make_admin_key(config) -> str:
    client = etcd_mod.connect(config.etcd)
    try:
        return (await keys.create_admin_key(Store(client, config.etcd.prefix).admin_keys, "tests"))[0]
    finally:
        await client.close()


@pytest.fixture
async def registry_app(mesh_config):
    app = RegistryApp(mesh_config)
    app.port = await app.start()
    yield app
    await app.stop(0)


@pytest.fixture
async def registry(registry_app, mesh_config):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry_app.port}")
    yield registry_stub(channel, await make_admin_key(mesh_config))
    await channel.close()


async def test_admin_calls_need_an_admin_key(registry_app, mesh_config):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_app.port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        client = etcd_mod.connect(mesh_config.etcd)
        tenant_key, _ = await keys.create_api_key(Store(client, mesh_config.etcd.prefix).api_keys, "t")
        await client.close()
        for metadata in [(), (("authorization", "Bearer llsadm_nope"),), (("authorization", f"Bearer {tenant_key}"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListAliases(pb.ListAliasesRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health and reflection stay open (buf curl, orchestrators).
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def version(vid="m-v1", kind=pb.MODEL_KIND_GENERATE, **kw):
    fields = dict(version=vid, family="m", kind=kind, weights_source="file:/nowhere", context_length=2048)
    return pb.ModelVersion(**{**fields, **kw})


async def test_create_get_list_and_defaults(registry):
    created = (await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version()))).model_version
    assert created.engine == "torch" and created.state == pb.MODEL_STATE_ACTIVE and created.created > 0
    got = (await registry.GetModelVersion(pb.GetModelVersionRequest(version="m-v1"))).model_version
    assert got == created
    listed = (await registry.ListModelVersions(pb.ListModelVersionsRequest())).model_versions
    assert [v.version for v in listed] == ["m-v1"]


async def test_versions_are_immutable_but_idempotent_create_is_allowed(registry):
    await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version()))
    again = await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version(),
                                                                           allow_existing=True))
    assert again.model_version.version == "m-v1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version()))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    changed = version(context_length=4096)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=changed, allow_existing=True))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("bad, field", [
    (dict(vid="Bad Name"), "model_version.version"),
    (dict(kind=pb.MODEL_KIND_UNSPECIFIED), "model_version.kind"),
    (dict(engine="onnx"), "model_version.engine"),
    (dict(context_length=0), "context_length"),
    (dict(price_per_1k_prompt_tokens=-1.0), "price_per_1k_prompt_tokens"),
    (dict(quantization="int4"), "model_version.quantization='int4' is unknown"),
    (dict(quantization="int8", kind=pb.MODEL_KIND_EMBED), "generation models on the torch engine only"),
])
async def test_invalid_versions_name_the_field(registry, bad, field):
    v = version(**bad)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=v))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


async def test_alias_validation_and_delete_protection(registry):
    await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version("m-v1")))
    await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version("e-v1", pb.MODEL_KIND_EMBED)))
    for targets, needle in [
        ([], "at least one"),
        ([pb.TrafficSplit(version="nope", weight=1)], "does not exist"),
        ([pb.TrafficSplit(version="m-v1", weight=0)], "weight"),
        ([pb.TrafficSplit(version="m-v1", weight=1), pb.TrafficSplit(version="e-v1", weight=1)], "mix"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.SetAlias(pb.SetAliasRequest(alias=pb.Alias(name="m", targets=targets)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    await registry.SetAlias(pb.SetAliasRequest(alias=pb.Alias(name="m", targets=[pb.TrafficSplit(version="m-v1",
                                                                                                  weight=1)])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.DeleteModelVersion(pb.DeleteModelVersionRequest(version="m-v1"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.GetAlias(pb.GetAliasRequest(name="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_view_follows_changes_by_watch_and_splits_traffic(registry, mesh_config):
    client = etcd_mod.connect(mesh_config.etcd)
    view = RegistryView(client, mesh_config.etcd.prefix)
    assert await view.start()
    try:
        for vid in ("m-v1", "m-v2"):
            await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version(vid)))
        await registry.SetAlias(pb.SetAliasRequest(alias=pb.Alias(name="m", targets=[
            pb.TrafficSplit(version="m-v1", weight=3), pb.TrafficSplit(version="m-v2", weight=1)])))
        assert await view.aliases.wait_for(lambda s: "m" in s, 5)
        assert await view.versions.wait_for(lambda s: len(s) == 2, 5)
        picks = [view.resolve("m").version.version for _ in range(2000)]
        assert 0.70 < picks.count("m-v1") / len(picks) < 0.80
        # Sticky per user: the same user always lands on the same version.
        assert len({view.resolve("m", user="alice").version.version for _ in range(50)}) == 1
        users = {view.resolve("m", user=f"u{i}").version.version for i in range(200)}
        assert users == {"m-v1", "m-v2"}
        assert view.resolve("m-v2").version.version == "m-v2" and view.resolve("m-v2").alias == ""
        assert view.resolve("unknown") is None
        # A live change of the split reaches the view without polling.
        await registry.SetAlias(pb.SetAliasRequest(alias=pb.Alias(name="m", targets=[
            pb.TrafficSplit(version="m-v2", weight=1)])))
        assert await view.aliases.wait_for(lambda s: len(s["m"].targets) == 1, 5)
        assert {view.resolve("m").version.version for _ in range(50)} == {"m-v2"}
    finally:
        await view.stop()
        await client.close()


async def test_view_keeps_last_snapshot_when_etcd_is_down(registry, mesh_config, etcd):
    await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version("m-v1")))
    client = etcd_mod.connect(mesh_config.etcd)
    view = RegistryView(client, mesh_config.etcd.prefix)
    assert await view.start()
    try:
        etcd.pause()
        import asyncio
        await asyncio.sleep(0.5)
        assert view.resolve("m-v1").version.version == "m-v1"
    finally:
        etcd.resume()
        await view.stop()
        await client.close()


@pytest.mark.parametrize("name", ["acme\n", "acme\nevil", "\nacme", "acme "])
def test_names_are_matched_whole(name):
    from llmserve.admin.v1 import tenants_pb2
    from llmserve.common.errors import ServiceError
    from llmserve.registry.service import check_name
    from llmserve.registry.tenants import validate_tenant

    for check in (lambda: validate_tenant(tenants_pb2.Tenant(name=name)),
                  lambda: check_name("alias.name", name)):
        with pytest.raises(ServiceError) as err:
            check()
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "is invalid" in err.value.message
    validate_tenant(tenants_pb2.Tenant(name="acme"))
    check_name("alias.name", "acme")


async def test_a_version_name_with_a_trailing_newline_is_refused(registry):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateModelVersion(pb.CreateModelVersionRequest(model_version=version("m-v1\n")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_version.version" in err.value.details()
