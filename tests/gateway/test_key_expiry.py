"""API keys that expire or are revoked are refused by the gateway (UNAUTHENTICATED, saying which), through a real
registry, etcd and gateway; expiry is checked at each request, not by a watch event."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import yaml

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import start_mesh
from tests.registry.test_admin_keys import cli


@pytest.fixture(scope="module")
async def mesh(make_config):
    # ListModels only authenticates: no model and no worker is needed to see a key accepted or refused.
    mesh = await start_mesh(make_config(), versions=[], aliases={}, worker_models=[])
    yield mesh
    await mesh.stop()


async def new_key(mesh, **fields) -> tpb.CreateApiKeyResponse:
    made = await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="test-tenant", **fields))
    assert await mesh.gateway.view.keys.wait_for(lambda s: made.api_key.key_hash in s, 5)
    return made


async def list_models(mesh, key: str) -> grpc.aio.AioRpcError | None:
    try:
        await mesh.stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),))
        return None
    except grpc.aio.AioRpcError as exc:
        return exc


async def test_an_api_key_expires_on_time(mesh):
    made = await new_key(mesh, ttl_seconds=1)
    assert made.api_key.expires == pytest.approx(time.time() + 1, abs=2)
    assert await list_models(mesh, made.key) is None
    await asyncio.sleep(max(0.0, made.api_key.expires - time.time()) + 0.05)
    err = await list_models(mesh, made.key)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"the API key {made.api_key.key_id} expired at" in err.details()
    # Nothing changed in etcd: the gateway's snapshot still holds the key as it was created.
    assert mesh.gateway.view.keys.snapshot[made.api_key.key_hash].expires == made.api_key.expires


async def test_revoked_and_unknown_keys_are_told_apart(mesh):
    made = await new_key(mesh)
    await mesh.tenants.RevokeApiKey(tpb.RevokeApiKeyRequest(key_id=made.api_key.key_id))
    assert await mesh.gateway.view.keys.wait_for(lambda s: s[made.api_key.key_hash].revoked, 1.0)
    err = await list_models(mesh, made.key)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"the API key {made.api_key.key_id} is revoked" in err.details()
    err = await list_models(mesh, "lls_not-a-key")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "the API key is unknown"


async def test_a_rotated_key_keeps_its_lifetime_and_limits(mesh):
    made = await new_key(mesh, ttl_seconds=3600, max_concurrent_requests=3, requests_per_minute=7)
    rotated = (await mesh.tenants.RotateApiKey(tpb.RotateApiKeyRequest(key_id=made.api_key.key_id))).api_key
    assert rotated.expires - rotated.created == 3600
    assert (rotated.max_concurrent_requests, rotated.requests_per_minute) == (3, 7)
    forever = await new_key(mesh)
    assert forever.api_key.expires == 0
    again = await mesh.tenants.RotateApiKey(tpb.RotateApiKeyRequest(key_id=forever.api_key.key_id))
    assert again.api_key.expires == 0


@pytest.mark.parametrize("fields, needle", [
    (dict(ttl_seconds=2**32 - 1), "ttl_seconds"),
    (dict(max_concurrent_requests=-2), "max_concurrent_requests"),
    (dict(description="x" * 257), "description has 257 characters; at most 256"),
])
async def test_bad_key_settings_name_the_field(mesh, fields, needle):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="test-tenant", **fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


async def test_cli_key_create_with_ttl_and_cap(mesh, tmp_path):
    config_path = tmp_path / "llmserve.yaml"
    config_path.write_text(yaml.safe_dump({"registry": {"port": mesh.registry.service.port}}))
    auth = ("--admin-key", mesh.admin_key)
    code, key, err = await cli(config_path, "keys", "create", "--tenant", "test-tenant", "--ttl", "90m",
                               "--max-concurrent", "2", "--description", "cli-ttl", *auth)
    assert code == 0 and key.startswith("lls_"), err
    code, listing, _ = await cli(config_path, "keys", "list", "--tenant", "test-tenant", *auth)
    (line,) = [line for line in listing.splitlines() if line.endswith("cli-ttl")]
    assert "active" in line and "expires never" not in line and "concurrent=2" in line
