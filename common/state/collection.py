"""One typed collection: records of one protobuf message under an etcd prefix, each at `<prefix><name>`.

Every record kind of the mesh (versions, aliases, tenants, keys, workers) is an instance of it (store.Store), so
get/list/put/create/delete are written once. Validation belongs to the caller (the registry's admin services).
"""

from __future__ import annotations

import builtins
import typing

import aetcd
from google.protobuf.message import Message

from llmserve.common.state.codec import decoder, encode
from llmserve.common.state.watcher import PrefixWatcher

M = typing.TypeVar("M", bound=Message)


class Collection(typing.Generic[M]):
    """Records of type `message` under `prefix`; `name(record)` is the key suffix a record is stored under."""

    def __init__(self, client: aetcd.Client, prefix: str, message: type[M], name: typing.Callable[[M], str],
                 order: typing.Callable[[M], typing.Any] | None = None):
        self.client = client
        self.prefix = prefix.rstrip("/") + "/"
        self.message = message
        self.name = name
        self.order = order or name  # how list() sorts
        self.decode = decoder(message)

    def _key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    async def get(self, name: str) -> M | None:
        kv = await self.client.get(self._key(name))
        return self.decode(kv.value) if kv else None

    async def get_with_revision(self, name: str) -> tuple[M | None, int]:
        """(record or None, its etcd mod revision; 0 when absent): what put_if_unchanged compares against."""
        kv = await self.client.get(self._key(name))
        return (self.decode(kv.value), kv.mod_revision) if kv else (None, 0)

    def under(self, sub: str) -> Collection[M]:
        """The records under `<prefix><sub>/` as a collection of their own (e.g. one alias's events)."""
        return Collection(self.client, self.prefix + sub, self.message, self.name, self.order)

    async def list(self) -> list[M]:
        return sorted((self.decode(kv.value) for kv in await self.client.get_prefix(self.prefix.encode())),
                      key=self.order)

    async def list_with_revisions(self) -> builtins.list[tuple[M, int]]:
        """(record, etcd mod revision) pairs in list order: what put_if_unchanged compares against."""
        pairs = [(self.decode(kv.value), kv.mod_revision) for kv in await self.client.get_prefix(self.prefix.encode())]
        return sorted(pairs, key=lambda pair: self.order(pair[0]))

    async def find(self, predicate: typing.Callable[[M], bool]) -> M | None:
        """The first record (in list order) for which predicate holds; for lookups by a field other than the name."""
        return next((r for r in await self.list() if predicate(r)), None)

    async def put(self, record: M, *, lease: aetcd.Lease | int | None = None) -> None:
        """Writes the record, replacing any under its name; with a lease it goes when the lease expires."""
        await self.client.put(self._key(self.name(record)), encode(record), lease=lease)

    async def create(self, record: M) -> bool:
        """Writes the record only if its name is free (atomically). Returns False, writing nothing, when it is not."""
        key = self._key(self.name(record))
        txn = self.client.transactions
        ok, _ = await self.client.transaction(compare=[txn.version(key) == 0],
                                              success=[txn.put(key, encode(record))], failure=[])
        return ok

    async def put_if_unchanged(self, record: M, unchanged: dict[str, int]) -> bool:
        """Writes the record only if every named record still has the mod revision given (atomically), so a
        decision taken over several records holds when it is written. Returns False, writing nothing, if not."""
        txn = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[txn.mod(self._key(name)) == revision for name, revision in unchanged.items()],
            success=[txn.put(self._key(self.name(record)), encode(record))], failure=[])
        return ok

    async def delete(self, name: str) -> None:
        await self.client.delete(self._key(name))

    def watcher(self, on_change: typing.Callable[[], None] | None = None) -> PrefixWatcher[M]:
        """A watch of this collection (not started): snapshot maps name -> record, kept current by etcd."""
        return PrefixWatcher(self.client, self.prefix, self.decode, on_change)
