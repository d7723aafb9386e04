"""RegistryView: the live, read-only view of the registry that services route by, kept current by etcd watches."""

from __future__ import annotations

import hashlib
import math
import random
import typing

import aetcd

from llmserve.admin.v1 import keys_pb2, registry_pb2, tenants_pb2
from llmserve.common.state.keys import hash_key
from llmserve.common.state.keys import state as key_state
from llmserve.common.state.store import Store
from llmserve.dispatch.v1 import worker_pb2


class Resolution(typing.NamedTuple):
    version: registry_pb2.ModelVersion
    alias: str  # "" when the caller named a version


class RegistryView:
    """Watches of versions and aliases, and on request of keys and tenants (gateway) or workers (scheduler).

    Each watcher's `snapshot` maps a record's name to the record; nothing here polls or writes.
    """

    def __init__(self, client: aetcd.Client, prefix: str, *, watch_keys: bool = False,
                 watch_workers: bool = False, on_workers_change: typing.Callable[[], None] | None = None):
        store = Store(client, prefix)
        self.versions = store.versions.watcher()
        self.aliases = store.aliases.watcher()
        self.keys = store.api_keys.watcher() if watch_keys else None
        self.tenants = store.tenants.watcher() if watch_keys else None
        self.workers = store.workers.watcher(on_workers_change) if watch_workers else None
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
        """The record of a usable key: None when unknown, revoked or expired (now, by the clock)."""
        record = self.api_key_record(key)
        return None if record is None or key_state(record) != "active" else record

    def api_key_record(self, key: str) -> keys_pb2.ApiKey | None:
        """The record of a key whatever its state (revoked and expired ones included); None when unknown."""
        assert self.keys is not None, "RegistryView built without watch_keys"
        return self.keys.snapshot.get(hash_key(key))

    def tenant(self, name: str) -> tenants_pb2.Tenant | None:
        assert self.tenants is not None, "RegistryView built without watch_keys"
        return self.tenants.snapshot.get(name)

    def worker_members(self) -> dict[str, worker_pb2.WorkerInfo]:
        assert self.workers is not None, "RegistryView built without watch_workers"
        return self.workers.snapshot

    def resolve(self, name: str, user: str = "") -> Resolution | None:
        """Model name -> concrete version: a version id as is; an alias by its traffic split.

        With a `user` (the gateway passes the tenant when a request names none), the pick is sticky: weighted
        rendezvous hashing over (alias, version, user), so each arm gets its weight's share of users, and when
        weights change only users that must move do (a canary going 5% -> 25% keeps its 5% and takes a fifth of
        the rest; no user moves between the arms whose weights did not change). Without one it is random by weight.
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
        if user:
            target = max(alias.targets, key=lambda t: rendezvous_score(name, t.version, user, t.weight))
        else:
            point = random.randrange(total)
            for target in alias.targets:
                point -= target.weight
                if point < 0:
                    break
        found = self.versions.snapshot.get(target.version)
        return Resolution(found, name) if found is not None else None


def rendezvous_score(alias: str, version: str, user: str, weight: int) -> float:
    """Weighted rendezvous (highest random weight) score: -w / ln(h) with h uniform in (0, 1) from a hash of
    (alias, version, user); the highest score wins, each arm with probability w / sum(w)."""
    digest = hashlib.blake2b(f"{alias}\0{version}\0{user}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 0.5) / 2**64
    return -weight / math.log(h) if weight > 0 else -math.inf
