"""Admin keys through a real registry over real etcd: listed, created with a lifetime, revoked; a revoked or
expired admin key is refused (UNAUTHENTICATED, saying which); the last active admin key cannot be revoked."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import grpc
import pytest
import yaml

from llmserve.admin.v1 import admin_keys_pb2 as apb
from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.clients.admin import admin_key_stub, registry_stub
from llmserve.common import etcd as etcd_mod
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.registry.app import RegistryApp
from tests.registry.test_registry import make_admin_key


@pytest.fixture
async def registry_app(mesh_config):
    app = RegistryApp(mesh_config)
    app.port = await app.start()
    yield app
    await app.stop(0)


@pytest.fixture
async def channel(registry_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_app.port}") as channel:
        yield channel


async def refusal(channel, key: str) -> grpc.aio.AioRpcError | None:
    """None when `key` may call an admin RPC, else the error."""
    try:
        await registry_stub(channel, key).ListAliases(rpb.ListAliasesRequest())
        return None
    except grpc.aio.AioRpcError as exc:
        return exc


async def test_admin_keys_are_listed_created_and_revoked(registry_app, channel, mesh_config):
    first = await make_admin_key(mesh_config)
    admin = admin_key_stub(channel, first)
    made = await admin.CreateAdminKey(apb.CreateAdminKeyRequest(description="ops", ttl_seconds=3600))
    assert made.key.startswith(keys.ADMIN_KEY_PREFIX) and made.admin_key.key_id.startswith("adm_")
    assert made.admin_key.expires == pytest.approx(time.time() + 3600, abs=5)
    assert await refusal(channel, made.key) is None
    listed = (await admin.ListAdminKeys(apb.ListAdminKeysRequest())).admin_keys
    assert sorted(k.description for k in listed) == ["ops", "tests"]
    assert all(made.key not in str(k) for k in listed)  # hashes only

    revoked = (await admin.RevokeAdminKey(apb.RevokeAdminKeyRequest(key_id=made.admin_key.key_id))).admin_key
    assert revoked.revoked
    assert await registry_app.admin_keys.wait_for(lambda s: s[made.admin_key.key_hash].revoked, 1.0)
    err = await refusal(channel, made.key)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"the admin key {made.admin_key.key_id} is revoked" in err.details()
    listed = {k.key_id: k for k in (await admin.ListAdminKeys(apb.ListAdminKeysRequest())).admin_keys}
    assert listed[made.admin_key.key_id].revoked  # still listed
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await admin.RevokeAdminKey(apb.RevokeAdminKeyRequest(key_id="adm_000000000000"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_admin_key_expires_on_time_with_nothing_changing_in_etcd(registry_app, channel, mesh_config):
    admin = admin_key_stub(channel, await make_admin_key(mesh_config))
    made = await admin.CreateAdminKey(apb.CreateAdminKeyRequest(ttl_seconds=1))
    assert await refusal(channel, made.key) is None
    await asyncio.sleep(max(0.0, made.admin_key.expires - time.time()) + 0.05)
    err = await refusal(channel, made.key)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"the admin key {made.admin_key.key_id} expired at" in err.details()
    # Not revoked: no watch event told the registry anything; the clock did.
    assert not registry_app.admin_keys.snapshot[made.admin_key.key_hash].revoked
    for bad_request, needle in [(apb.CreateAdminKeyRequest(ttl_seconds=keys.MAX_EXPIRES), "ttl_seconds"),
                                (apb.CreateAdminKeyRequest(description="\u0645" * 10000), "at most 256")]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.CreateAdminKey(bad_request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in bad.value.details()


async def test_the_last_active_admin_key_cannot_be_revoked(registry_app, channel, mesh_config):
    only = await make_admin_key(mesh_config)
    admin = admin_key_stub(channel, only)
    (record,) = (await admin.ListAdminKeys(apb.ListAdminKeysRequest())).admin_keys
    expiring = await admin.CreateAdminKey(apb.CreateAdminKeyRequest(ttl_seconds=1))
    await asyncio.sleep(max(0.0, expiring.admin_key.expires - time.time()) + 0.05)
    # The expired key does not count as another active one.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.RevokeAdminKey(apb.RevokeAdminKeyRequest(key_id=record.key_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only active admin key" in err.value.details() and "successor first" in err.value.details()
    assert await refusal(channel, only) is None
    # An expired key may be revoked, and once a successor exists the old one may go.
    await admin.RevokeAdminKey(apb.RevokeAdminKeyRequest(key_id=expiring.admin_key.key_id))
    successor = await admin.CreateAdminKey(apb.CreateAdminKeyRequest())
    await admin.RevokeAdminKey(apb.RevokeAdminKeyRequest(key_id=record.key_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin_key_stub(channel, successor.key).RevokeAdminKey(
            apb.RevokeAdminKeyRequest(key_id=successor.admin_key.key_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_two_keys_revoked_at_once_cannot_both_go(mesh_config):
    """Each revocation alone leaves another active key; done together they would leave none. The check and the
    write are one etcd transaction over the active keys' revisions, so exactly one of them succeeds."""
    client = etcd_mod.connect(mesh_config.etcd)
    store = Store(client, mesh_config.etcd.prefix)
    try:
        for _ in range(5):
            pair = [(await keys.create_admin_key(store.admin_keys))[1] for _ in range(2)]
            results = await asyncio.gather(*(keys.revoke_admin_key(store.admin_keys, r.key_id) for r in pair),
                                           return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["AdminKey", "LastAdminKey"], results
            assert sum(not r.revoked for r in await store.admin_keys.list()) == 1
            for record in await store.admin_keys.list():  # the next round starts from none active
                record.revoked = True
                await store.admin_keys.put(record)
    finally:
        await client.close()


async def cli(config_path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmserve.clients.cli", "--config", str(config_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LLMSERVE_ADMIN_KEY": ""})
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_cli_admin_key_list_create_with_ttl_and_revoke(registry_app, mesh_config, tmp_path):
    config_path = tmp_path / "llmserve.yaml"
    config_path.write_text(yaml.safe_dump({"etcd": {"port": mesh_config.etcd.port, "prefix": mesh_config.etcd.prefix},
                                           "registry": {"port": registry_app.port}}))
    # No admin key at hand: bootstrap straight into etcd.
    code, bootstrap, err = await cli(config_path, "admin-key", "create", "--description", "boot")
    assert code == 0 and bootstrap.strip().startswith(keys.ADMIN_KEY_PREFIX) and "bootstrap" in err
    auth = ("--admin-key", bootstrap.strip())
    code, made, err = await cli(config_path, "admin-key", "create", "--ttl", "2h", "--description", "temp", *auth)
    assert code == 0 and made.strip().startswith(keys.ADMIN_KEY_PREFIX), err
    code, listing, _ = await cli(config_path, "admin-key", "list", *auth)
    lines = {line.split()[-1]: line for line in listing.splitlines()}  # by description
    assert code == 0 and len(lines) == 2 and "active" in lines["boot"] and "expires never" in lines["boot"]
    assert "active" in lines["temp"] and "expires never" not in lines["temp"]
    temp_id, boot_id = lines["temp"].split()[0], lines["boot"].split()[0]
    code, out, _ = await cli(config_path, "admin-key", "revoke", temp_id, *auth)
    assert code == 0 and f"revoked {temp_id}" in out
    code, listing, _ = await cli(config_path, "admin-key", "list", *auth)
    assert "revoked" in {line.split()[-1]: line for line in listing.splitlines()}["temp"]
    code, _, err = await cli(config_path, "admin-key", "revoke", boot_id, *auth)
    assert code == 1 and "FAILED_PRECONDITION" in err
    code, _, err = await cli(config_path, "admin-key", "create", "--ttl", "soon", *auth)
    assert code == 2 and "not a duration" in err
