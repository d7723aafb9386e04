"""The shared etcd state layer against a real etcd: typed collections, keys, watches and the stored layout."""

import pytest

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.common import etcd as etcd_mod
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.common.state.views import RegistryView
from llmserve.dispatch.v1 import worker_pb2


@pytest.fixture
async def store(mesh_config):
    client = etcd_mod.connect(mesh_config.etcd)
    yield Store(client, mesh_config.etcd.prefix)
    await client.close()


def version(vid: str, **kw) -> rpb.ModelVersion:
    fields = dict(version=vid, family="m", kind=rpb.MODEL_KIND_GENERATE, weights_source="file:/x",
                  context_length=2048)
    return rpb.ModelVersion(**{**fields, **kw})


async def test_put_get_list_and_delete_by_name(store):
    assert await store.versions.get("m-v1") is None
    assert await store.versions.list() == []
    for vid in ("m-v2", "m-v1", "m-v3"):
        await store.versions.put(version(vid))
    assert await store.versions.get("m-v1") == version("m-v1")
    assert [v.version for v in await store.versions.list()] == ["m-v1", "m-v2", "m-v3"]
    await store.versions.put(version("m-v1", context_length=4096))  # put replaces
    assert (await store.versions.get("m-v1")).context_length == 4096
    await store.versions.delete("m-v2")
    await store.versions.delete("never-there")  # deleting a missing name is not an error
    assert [v.version for v in await store.versions.list()] == ["m-v1", "m-v3"]


async def test_create_refuses_a_taken_name_and_leaves_the_record_alone(store):
    assert await store.tenants.create(tpb.Tenant(name="acme", requests_per_minute=10))
    assert not await store.tenants.create(tpb.Tenant(name="acme", requests_per_minute=99))
    assert (await store.tenants.get("acme")).requests_per_minute == 10
    assert await store.tenants.create(tpb.Tenant(name="beta"))
    assert [t.name for t in await store.tenants.list()] == ["acme", "beta"]


async def test_collections_of_different_kinds_do_not_see_each_other(store):
    await store.versions.put(version("same"))
    await store.aliases.put(rpb.Alias(name="same", targets=[rpb.TrafficSplit(version="same", weight=1)]))
    assert [v.version for v in await store.versions.list()] == ["same"]
    assert [a.name for a in await store.aliases.list()] == ["same"]
    await store.aliases.delete("same")
    assert await store.versions.get("same") is not None


async def test_stored_layout_is_compact_sorted_json_and_old_values_still_read(store, mesh_config):
    await store.versions.put(version("m-v1"))
    raw = (await store.client.get(f"{mesh_config.etcd.prefix}/registry/versions/m-v1".encode())).value
    assert raw == (b'{"contextLength": 2048, "family": "m", "kind": "MODEL_KIND_GENERATE", "version": "m-v1", '
                   b'"weightsSource": "file:/x"}')
    # A value written by hand (etcdctl) or by a newer release with fields this one does not know still reads.
    await store.client.put(f"{mesh_config.etcd.prefix}/tenants/old".encode(),
                           b'{"name": "old", "tokensPerMinute": 5, "fieldFromTheFuture": true}')
    assert (await store.tenants.get("old")).tokens_per_minute == 5


async def test_api_keys_are_stored_by_hash_looked_up_by_key_and_revoked_by_id(store, mesh_config):
    key, record = await keys.create_api_key(store.api_keys, "acme", "ci", requests_per_minute=7)
    assert key.startswith(keys.KEY_PREFIX) and record.key_hash == keys.hash_key(key)
    stored = (await store.client.get(f"{mesh_config.etcd.prefix}/keys/{record.key_hash}".encode())).value
    assert key.encode() not in stored
    assert (await keys.lookup(store.api_keys, key)).requests_per_minute == 7
    assert await keys.lookup(store.api_keys, key + "x") is None
    assert await keys.lookup(store.admin_keys, key) is None  # a tenant key is no admin key
    assert (await keys.api_key_by_id(store.api_keys, record.key_id)).tenant == "acme"
    assert (await keys.revoke_api_key(store.api_keys, record.key_id)).revoked
    assert (await keys.lookup(store.api_keys, key)).revoked
    assert await keys.revoke_api_key(store.api_keys, "key_unknown") is None
    with pytest.raises(ValueError):
        await keys.create_api_key(store.api_keys, "")


async def test_admin_keys(store):
    key, record = await keys.create_admin_key(store.admin_keys, "ops")
    assert key.startswith(keys.ADMIN_KEY_PREFIX) and record.key_id.startswith("adm_")
    assert (await keys.lookup(store.admin_keys, key)).description == "ops"
    assert await keys.lookup(store.api_keys, key) is None


async def test_a_leased_record_goes_with_its_lease(store):
    lease = await store.client.lease(30)
    await store.workers.put(worker_pb2.WorkerInfo(worker_id="w1", address="127.0.0.1:1"), lease=lease)
    assert (await store.workers.get("w1")).address == "127.0.0.1:1"
    await lease.revoke()
    assert await store.workers.get("w1") is None


async def test_watcher_follows_changes_and_skips_undecodable_values(store, mesh_config):
    await store.client.put(f"{mesh_config.etcd.prefix}/registry/versions/broken".encode(), b"not json")
    await store.versions.put(version("m-v1"))
    watcher = store.versions.watcher()
    watcher.start()
    try:
        assert await watcher.wait_ready(5)
        assert set(watcher.snapshot) == {"m-v1"}
        await store.versions.put(version("m-v2"))
        assert await watcher.wait_for(lambda s: "m-v2" in s, 5)
        await store.client.put(f"{mesh_config.etcd.prefix}/registry/versions/m-v2".encode(), b"{oops")
        await store.versions.delete("m-v1")
        assert await watcher.wait_for(lambda s: "m-v1" not in s, 5)
        assert watcher.snapshot["m-v2"] == version("m-v2")  # the bad write kept the last good record
    finally:
        await watcher.stop()


async def test_view_resolves_versions_and_hides_revoked_keys(store, mesh_config):
    await store.versions.put(version("m-v1"))
    await store.aliases.put(rpb.Alias(name="m", targets=[rpb.TrafficSplit(version="m-v1", weight=1)]))
    key, record = await keys.create_api_key(store.api_keys, "acme")
    view = RegistryView(store.client, mesh_config.etcd.prefix, watch_keys=True)
    assert await view.start()
    try:
        assert view.resolve("m") == (version("m-v1"), "m")
        assert view.resolve("m-v1").alias == ""
        assert view.api_key(key).key_id == record.key_id
        await keys.revoke_api_key(store.api_keys, record.key_id)
        assert await view.keys.wait_for(lambda s: s[record.key_hash].revoked, 5)
        assert view.api_key(key) is None
    finally:
        await view.stop()
