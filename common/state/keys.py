"""API keys and admin keys: 256 random bits shown once to whoever creates them; only their SHA-256 is stored,
as the record's name, so a key is looked up by hashing it."""

from __future__ import annotations

import hashlib
import secrets
import time
import typing

from llmserve.admin.v1 import keys_pb2
from llmserve.common.state.collection import Collection

M = typing.TypeVar("M", keys_pb2.ApiKey, keys_pb2.AdminKey)

KEY_PREFIX = "lls_"
ADMIN_KEY_PREFIX = "llsadm_"


def hash_key(key: str) -> str:
    # Keys are 256 bits of randomness, so a fast unsalted hash is safe to store (as GitHub/Stripe tokens are).
    return hashlib.sha256(key.encode()).hexdigest()


async def lookup(records: Collection[M], key: str) -> M | None:
    """The record of an API key (in store.api_keys) or an admin key (in store.admin_keys); None if unknown."""
    return await records.get(hash_key(key))


async def create_api_key(api_keys: Collection[keys_pb2.ApiKey], tenant: str, description: str = "",
                         requests_per_minute: int = 0, tokens_per_minute: int = 0) -> tuple[str, keys_pb2.ApiKey]:
    """A new key for `tenant` (whose existence is the caller's to check). Returns (key, stored record)."""
    if not tenant or len(tenant) > 128:
        raise ValueError("tenant must be 1-128 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = keys_pb2.ApiKey(key_id="key_" + digest[:12], tenant=tenant, key_hash=digest,
                             created=int(time.time()), description=description,
                             requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
    await api_keys.put(record)
    return key, record


async def api_key_by_id(api_keys: Collection[keys_pb2.ApiKey], key_id: str) -> keys_pb2.ApiKey | None:
    return await api_keys.find(lambda k: k.key_id == key_id)


async def revoke_api_key(api_keys: Collection[keys_pb2.ApiKey], key_id: str) -> keys_pb2.ApiKey | None:
    """Marks the key revoked (the record stays, so usage still names it). Returns it, or None if unknown."""
    record = await api_key_by_id(api_keys, key_id)
    if record is not None:
        record.revoked = True
        await api_keys.put(record)
    return record


async def create_admin_key(admin_keys: Collection[keys_pb2.AdminKey],
                           description: str = "") -> tuple[str, keys_pb2.AdminKey]:
    key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = keys_pb2.AdminKey(key_id="adm_" + digest[:12], key_hash=digest, created=int(time.time()),
                               description=description)
    await admin_keys.put(record)
    return key, record
