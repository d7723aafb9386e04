"""The etcd-backed registry: model versions, aliases with traffic splits, API keys and worker membership.

Layout under the configured prefix (values are protobuf JSON, readable with etcdctl):
  registry/versions/<version>  ModelVersion
  registry/aliases/<name>      Alias
  tenants/<name>               Tenant
  keys/<sha256 of key>         ApiKey
  admin_keys/<sha256 of key>   AdminKey
  workers/<worker_id>          WorkerInfo (attached to the worker's lease)
The registry service writes versions and aliases; everyone else reads through watchers (RegistryView).
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import typing
import zlib

import aetcd
from google.protobuf import json_format

from llmserve.admin.v1 import keys_pb2, registry_pb2, tenants_pb2
from llmserve.common.etcd import PrefixWatcher
from llmserve.dispatch.v1 import worker_pb2

M = typing.TypeVar("M")

KEY_PREFIX = "lls_"
ADMIN_KEY_PREFIX = "llsadm_"


def encode(message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def decoder(cls: type[M]) -> typing.Callable[[bytes], M]:
    def decode(data: bytes) -> M:
        return json_format.Parse(data, cls(), ignore_unknown_fields=True)
    return decode


async def put_if_absent(client: aetcd.Client, key: str, message) -> bool:
    """Writes the message only if the key does not exist (atomic). Returns False when it exists."""
    txn = client.transactions
    ok, _ = await client.transaction(compare=[txn.version(key.encode()) == 0],
                                     success=[txn.put(key.encode(), encode(message))], failure=[])
    return ok


def hash_key(key: str) -> str:
    # Keys are 256 bits of randomness, so a fast unsalted hash is safe to store (as GitHub/Stripe tokens are).
    return hashlib.sha256(key.encode()).hexdigest()


class Paths:
    def __init__(self, prefix: str):
        root = prefix.rstrip("/")
        self.versions = f"{root}/registry/versions/"
        self.aliases = f"{root}/registry/aliases/"
        self.keys = f"{root}/keys/"
        self.admin_keys = f"{root}/admin_keys/"
        self.tenants = f"{root}/tenants/"
        self.workers = f"{root}/workers/"


class RegistryStore:
    """Reads and writes of registry records. Validation is the registry service's job."""

    def __init__(self, client: aetcd.Client, prefix: str):
        self.client = client
        self.paths = Paths(prefix)

    async def get_version(self, version: str) -> registry_pb2.ModelVersion | None:
        kv = await self.client.get((self.paths.versions + version).encode())
        return decoder(registry_pb2.ModelVersion)(kv.value) if kv else None

    async def list_versions(self) -> list[registry_pb2.ModelVersion]:
        decode = decoder(registry_pb2.ModelVersion)
        return sorted((decode(kv.value) for kv in await self.client.get_prefix(self.paths.versions.encode())),
                      key=lambda v: v.version)

    async def put_version(self, version: registry_pb2.ModelVersion) -> None:
        await self.client.put((self.paths.versions + version.version).encode(), encode(version))

    async def create_version(self, version: registry_pb2.ModelVersion) -> bool:
        return await put_if_absent(self.client, self.paths.versions + version.version, version)

    async def delete_version(self, version: str) -> None:
        await self.client.delete((self.paths.versions + version).encode())

    async def get_alias(self, name: str) -> registry_pb2.Alias | None:
        kv = await self.client.get((self.paths.aliases + name).encode())
        return decoder(registry_pb2.Alias)(kv.value) if kv else None

    async def list_aliases(self) -> list[registry_pb2.Alias]:
        decode = decoder(registry_pb2.Alias)
        return sorted((decode(kv.value) for kv in await self.client.get_prefix(self.paths.aliases.encode())),
                      key=lambda a: a.name)

    async def put_alias(self, alias: registry_pb2.Alias) -> None:
        await self.client.put((self.paths.aliases + alias.name).encode(), encode(alias))

    async def delete_alias(self, name: str) -> None:
        await self.client.delete((self.paths.aliases + name).encode())


class KeyStore:
    """Tenants, API keys and admin keys. Keys are 256 random bits shown once; only their SHA-256 is stored."""

    def __init__(self, client: aetcd.Client, prefix: str):
        self.client = client
        self.paths = Paths(prefix)

    async def _list(self, prefix: str, cls):
        decode = decoder(cls)
        return [decode(kv.value) for kv in await self.client.get_prefix(prefix.encode())]

    async def get_tenant(self, name: str) -> tenants_pb2.Tenant | None:
        kv = await self.client.get((self.paths.tenants + name).encode())
        return decoder(tenants_pb2.Tenant)(kv.value) if kv else None

    async def list_tenants(self) -> list[tenants_pb2.Tenant]:
        return sorted(await self._list(self.paths.tenants, tenants_pb2.Tenant), key=lambda t: t.name)

    async def create_tenant(self, tenant: tenants_pb2.Tenant) -> bool:
        return await put_if_absent(self.client, self.paths.tenants + tenant.name, tenant)

    async def put_tenant(self, tenant: tenants_pb2.Tenant) -> None:
        await self.client.put((self.paths.tenants + tenant.name).encode(), encode(tenant))

    async def create(self, tenant: str, description: str = "", requests_per_minute: int = 0,
                     tokens_per_minute: int = 0) -> tuple[str, keys_pb2.ApiKey]:
        if not tenant or len(tenant) > 128:
            raise ValueError("tenant must be 1-128 characters")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        record = keys_pb2.ApiKey(key_id="key_" + digest[:12], tenant=tenant, key_hash=digest,
                                 created=int(time.time()), description=description,
                                 requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
        await self.client.put((self.paths.keys + digest).encode(), encode(record))
        return key, record

    async def list(self) -> list[keys_pb2.ApiKey]:
        return sorted(await self._list(self.paths.keys, keys_pb2.ApiKey), key=lambda k: (k.tenant, k.created))

    async def lookup(self, key: str) -> keys_pb2.ApiKey | None:
        kv = await self.client.get((self.paths.keys + hash_key(key)).encode())
        return decoder(keys_pb2.ApiKey)(kv.value) if kv else None

    async def by_id(self, key_id: str) -> keys_pb2.ApiKey | None:
        return next((k for k in await self.list() if k.key_id == key_id), None)

    async def revoke(self, key_id: str) -> keys_pb2.ApiKey | None:
        record = await self.by_id(key_id)
        if record is not None:
            record.revoked = True
            await self.client.put((self.paths.keys + record.key_hash).encode(), encode(record))
        return record

    async def create_admin_key(self, description: str = "") -> tuple[str, keys_pb2.AdminKey]:
        key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        record = keys_pb2.AdminKey(key_id="adm_" + digest[:12], key_hash=digest, created=int(time.time()),
                                   description=description)
        await self.client.put((self.paths.admin_keys + digest).encode(), encode(record))
        return key, record

    async def lookup_admin_key(self, key: str) -> keys_pb2.AdminKey | None:
        kv = await self.client.get((self.paths.admin_keys + hash_key(key)).encode())
        return decoder(keys_pb2.AdminKey)(kv.value) if kv else None


class Resolution(typing.NamedTuple):
    version: registry_pb2.ModelVersion
    alias: str  # "" when the caller named a version


class RegistryView:
    """A live, read-only view of versions, aliases and keys, kept current by etcd watches (never polling)."""

    def __init__(self, client: aetcd.Client, prefix: str, *, watch_keys: bool = False,
                 watch_workers: bool = False, on_workers_change: typing.Callable[[], None] | None = None):
        paths = Paths(prefix)
        self.versions = PrefixWatcher(client, paths.versions, decoder(registry_pb2.ModelVersion))
        self.aliases = PrefixWatcher(client, paths.aliases, decoder(registry_pb2.Alias))
        self.keys = PrefixWatcher(client, paths.keys, decoder(keys_pb2.ApiKey)) if watch_keys else None
        self.tenants = PrefixWatcher(client, paths.tenants, decoder(tenants_pb2.Tenant)) if watch_keys else None
        self.workers = (PrefixWatcher(client, paths.workers, decoder(worker_pb2.WorkerInfo), on_workers_change)
                        if watch_workers else None)
        self._watchers = [w for w in (self.versions, self.aliases, self.keys, self.tenants, self.workers) if w]

    async def start(self, timeout_s: float = 5.0) -> bool:
        """Starts the watches; returns whether all loaded within timeout_s (they keep trying otherwise)."""
        for watcher in self._watchers:
            watcher.start()
        ready = [await w.wait_ready(timeout_s) for w in self._watchers]
        return all(ready)

    async def stop(self) -> None:
        for watcher in self._watchers:
            await watcher.stop()

    def api_key(self, key: str) -> keys_pb2.ApiKey | None:
        assert self.keys is not None, "RegistryView built without watch_keys"
        record = self.keys.snapshot.get(hash_key(key))
        return None if record is None or record.revoked else record

    def resolve(self, name: str, user: str = "") -> Resolution | None:
        """Model name -> concrete version: a version id as is; an alias by its traffic split.

        With a `user`, the pick is a stable hash of (alias, user), so a user stays on one side of an A/B split
        for as long as the weights do not change; without one it is random by weight.
        """
        version = self.versions.snapshot.get(name)
        if version is not None:
            return Resolution(version, "")
        alias = self.aliases.snapshot.get(name)
        if alias is None or not alias.targets:
            return None
        total = sum(t.weight for t in alias.targets)
        if total <= 0:
            return None
        point = (zlib.crc32(f"{name}\0{user}".encode()) % total) if user else random.randrange(total)
        for target in alias.targets:
            point -= target.weight
            if point < 0:
                found = self.versions.snapshot.get(target.version)
                return Resolution(found, name) if found is not None else None
        return None
