"""Operator helpers used by the CLI and the launcher: apply a models file to the registry, manage API keys."""

from __future__ import annotations

import asyncio
import os
import pathlib

import grpc
import yaml
from google.protobuf import json_format

from llmserve.admin.v1 import keys_pb2, registry_pb2, registry_pb2_grpc
from llmserve.common import etcd
from llmserve.common.config import MeshConfig
from llmserve.registry.store import KeyStore


def apply_models_file(registry_address: str, path: str | os.PathLike) -> list[str]:
    """Registers the versions (idempotently: identical ones are kept) and sets the aliases of a models file."""
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    done = []
    with grpc.insecure_channel(registry_address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
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


async def _with_keys(config: MeshConfig, fn):
    client = etcd.connect(config.etcd)
    try:
        return await fn(KeyStore(client, config.etcd.prefix))
    finally:
        await client.close()


def create_key(config: MeshConfig, tenant: str, description: str = "") -> tuple[str, keys_pb2.ApiKey]:
    return asyncio.run(_with_keys(config, lambda keys: keys.create(tenant, description)))


def list_keys(config: MeshConfig) -> list[keys_pb2.ApiKey]:
    return asyncio.run(_with_keys(config, lambda keys: keys.list()))


def revoke_key(config: MeshConfig, key_id: str) -> keys_pb2.ApiKey | None:
    return asyncio.run(_with_keys(config, lambda keys: keys.revoke(key_id)))


def ensure_dev_key(config: MeshConfig, path: pathlib.Path) -> tuple[str, bool]:
    """Reuses the key in `path` if etcd still knows it; otherwise creates one for tenant 'dev' and writes it
    with mode 0600. Returns (key, created)."""
    async def ensure(keys: KeyStore) -> tuple[str, bool]:
        if path.exists():
            key = path.read_text().strip()
            record = await keys.lookup(key)
            if record is not None and not record.revoked:
                return key, False
        key, _ = await keys.create("dev", "development key written by `llmserve run`")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.chmod(path, 0o600)
        return key, True
    return asyncio.run(_with_keys(config, ensure))
