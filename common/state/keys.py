"""API keys and admin keys: 256 random bits shown once to whoever creates them; only their SHA-256 is stored,
as the record's name, so a key is looked up by hashing it.

A key is refused once revoked (the record stays, so usage and listings still name it) or once its `expires`
(unix seconds, 0: never) has passed. Expiry is a comparison with the clock made by whoever checks the key, at
each request, so an expired key is refused even though nothing changed in etcd."""

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
MAX_EXPIRES = 2**32 - 1  # `expires` and `created` are uint32 unix seconds (until 2106)
MAX_DESCRIPTION = 256  # characters of a key's free-text description (records stay small: etcd caps a request)


class LastAdminKey(Exception):
    """Revoking this admin key would leave no active one (nobody could call the admin services any more)."""


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise ValueError(f"description has {len(description)} characters; at most {MAX_DESCRIPTION}")


def expiry(ttl_s: int, now: float | None = None) -> int:
    """`expires` of a key created now with a lifetime of ttl_s seconds (0: never expires)."""
    if ttl_s < 0:
        raise ValueError(f"ttl_seconds={ttl_s} must be >= 0 (0: never expires)")
    if ttl_s == 0:
        return 0
    expires = int(time.time() if now is None else now) + ttl_s
    if expires > MAX_EXPIRES:
        raise ValueError(f"ttl_seconds={ttl_s} ends after 2106 (unix time {MAX_EXPIRES}); use a shorter lifetime, "
                         "or 0 for a key that never expires")
    return expires


def state(record: keys_pb2.ApiKey | keys_pb2.AdminKey, now: float | None = None) -> str:
    """"active", "revoked" or "expired" at `now` (default: the clock now)."""
    if record.revoked:
        return "revoked"
    if record.expires and (time.time() if now is None else now) >= record.expires:
        return "expired"
    return "active"


def refusal(record: keys_pb2.ApiKey | keys_pb2.AdminKey, kind: str, now: float | None = None) -> str | None:
    """Why a key may not be used ("the API key key_ab12 is revoked", "... expired at 2026-12-01T10:00:00Z"), or
    None when it may. `kind` names it in the message ("API key", "admin key")."""
    found = state(record, now)
    if found == "revoked":
        return f"the {kind} {record.key_id} is revoked"
    if found == "expired":
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires))
        return f"the {kind} {record.key_id} expired at {when}"
    return None


def hash_key(key: str) -> str:
    # Keys are 256 bits of randomness, so a fast unsalted hash is safe to store (as GitHub/Stripe tokens are).
    return hashlib.sha256(key.encode()).hexdigest()


async def lookup(records: Collection[M], key: str) -> M | None:
    """The record of an API key (in store.api_keys) or an admin key (in store.admin_keys); None if unknown."""
    return await records.get(hash_key(key))


async def create_api_key(api_keys: Collection[keys_pb2.ApiKey], tenant: str, description: str = "",
                         requests_per_minute: int = 0, tokens_per_minute: int = 0, ttl_s: int = 0,
                         max_concurrent_requests: int = 0) -> tuple[str, keys_pb2.ApiKey]:
    """A new key for `tenant` (whose existence is the caller's to check), expiring after ttl_s seconds (0:
    never). Returns (key, stored record)."""
    if not tenant or len(tenant) > 128:
        raise ValueError("tenant must be 1-128 characters")
    check_description(description)
    now = int(time.time())
    expires = expiry(ttl_s, now)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = keys_pb2.ApiKey(key_id="key_" + digest[:12], tenant=tenant, key_hash=digest,
                             created=now, description=description, expires=expires,
                             requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                             max_concurrent_requests=max_concurrent_requests)
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


async def create_admin_key(admin_keys: Collection[keys_pb2.AdminKey], description: str = "",
                           ttl_s: int = 0) -> tuple[str, keys_pb2.AdminKey]:
    """A new admin key, expiring after ttl_s seconds (0: never). Returns (key, stored record)."""
    check_description(description)
    now = int(time.time())
    expires = expiry(ttl_s, now)
    key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    record = keys_pb2.AdminKey(key_id="adm_" + digest[:12], key_hash=digest, created=now,
                               description=description, expires=expires)
    await admin_keys.put(record)
    return key, record


async def revoke_admin_key(admin_keys: Collection[keys_pb2.AdminKey], key_id: str) -> keys_pb2.AdminKey | None:
    """Marks the admin key revoked. Returns it (already revoked: unchanged), None if unknown; raises LastAdminKey
    when no other admin key would stay active. The check and the write are one etcd transaction over the
    revisions of every active key, so two keys revoked at once cannot both pass as "another one is left"."""
    while True:
        pairs = await admin_keys.list_with_revisions()
        record = next((r for r, _ in pairs if r.key_id == key_id), None)
        if record is None or record.revoked:
            return record
        now = time.time()
        active = {r.key_hash: revision for r, revision in pairs if state(r, now) == "active"}
        if record.key_hash in active and len(active) == 1:  # an expired one may always be revoked
            raise LastAdminKey(key_id)
        revision = next(rev for r, rev in pairs if r.key_hash == record.key_hash)
        record.revoked = True
        if await admin_keys.put_if_unchanged(record, {**active, record.key_hash: revision}):
            return record
