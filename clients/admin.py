"""Operator helpers used by the CLI and the launcher: admin keys (bootstrap, straight in etcd), and calls to the
admin services (models file, tenants, API keys) with an admin key."""

from __future__ import annotations

import asyncio
import functools
import os
import pathlib

import grpc
import yaml
from google.protobuf import json_format

from llmserve.admin.v1 import admin_keys_pb2_grpc, registry_pb2, registry_pb2_grpc, tenants_pb2, tenants_pb2_grpc
from llmserve.common import etcd, tls
from llmserve.common.config import MeshConfig, SecurityConfig
from llmserve.common.state import keys as state_keys
from llmserve.common.state.store import Store


class WithAuth:
    """A stub whose every call carries `authorization: Bearer <key>`."""

    def __init__(self, stub, key: str):
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {key}"),)

    def __getattr__(self, name):
        return functools.partial(getattr(self._stub, name), metadata=self._metadata)


def registry_stub(channel, admin_key: str):
    return WithAuth(registry_pb2_grpc.RegistryServiceStub(channel), admin_key)


def tenant_stub(channel, admin_key: str):
    return WithAuth(tenants_pb2_grpc.TenantServiceStub(channel), admin_key)


def admin_key_stub(channel, admin_key: str):
    return WithAuth(admin_keys_pb2_grpc.AdminKeyServiceStub(channel), admin_key)


def write_secret(path: pathlib.Path, value: str) -> None:
    """Writes a secret file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)


async def _with_store(config: MeshConfig, fn):
    client = etcd.connect(config.etcd)
    try:
        return await fn(Store(client, config.etcd.prefix))
    finally:
        await client.close()


def create_admin_key(config: MeshConfig, description: str = "", ttl_s: int = 0) -> str:
    """Bootstrap: writes an admin key's hash straight into etcd (whoever can write etcd is an admin anyway)."""
    key, _ = asyncio.run(_with_store(config, lambda store: state_keys.create_admin_key(store.admin_keys, description,
                                                                                        ttl_s)))
    return key


def ensure_admin_key(config: MeshConfig, path: pathlib.Path) -> tuple[str, bool]:
    async def ensure(store: Store) -> tuple[str, bool]:
        if path.exists():
            key = path.read_text().strip()
            record = await state_keys.lookup(store.admin_keys, key)
            if record is not None and state_keys.state(record) == "active":  # not revoked, not expired
                return key, False
        key, _ = await state_keys.create_admin_key(store.admin_keys, "written by `llmserve run`")
        write_secret(path, key)
        return key, True
    return asyncio.run(_with_store(config, ensure))


def apply_models_file(registry_address: str, admin_key: str, path: str | os.PathLike,
                      security: SecurityConfig | None = None) -> list[str]:
    """Registers the versions (idempotently: identical ones are kept) and sets the aliases of a models file."""
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    done = []
    with tls.channel(registry_address, security or SecurityConfig()) as channel:
        stub = registry_stub(channel, admin_key)
        for item in data.get("versions", []):
            version = json_format.ParseDict(item, registry_pb2.ModelVersion())
            stub.CreateModelVersion(registry_pb2.CreateModelVersionRequest(model_version=version,
                                                                           allow_existing=True), timeout=10)
            done.append(f"version {version.version}")
        for item in data.get("aliases", []):
            alias = json_format.ParseDict(item, registry_pb2.Alias())
            stub.SetAlias(registry_pb2.SetAliasRequest(alias=alias), timeout=10)
            done.append(f"alias {alias.name} -> " + ", ".join(f"{t.version}:{t.weight}" for t in alias.targets))
    return done


def ensure_dev_key(config: MeshConfig, registry_address: str, admin_key: str, path: pathlib.Path
                   ) -> tuple[str, bool]:
    """Makes sure tenant 'dev' (no limits) exists and `path` holds a valid key for it (mode 0600), reusing the
    key already there when it is still valid. Returns (key, created)."""
    with tls.channel(registry_address, config.security) as channel:
        stub = tenant_stub(channel, admin_key)
        try:
            stub.CreateTenant(tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(name="dev")), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        if path.exists():
            key = path.read_text().strip()
            record = asyncio.run(_with_store(config, lambda store: state_keys.lookup(store.api_keys, key)))
            if record is not None and state_keys.state(record) == "active" and record.tenant == "dev":
                return key, False
        created = stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(
            tenant="dev", description="development key written by `llmserve run`"), timeout=10)
    write_secret(path, created.key)
    return created.key, True
