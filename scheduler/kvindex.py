"""The KV index of KV-aware routing: which worker's engine holds which prefix-cache block.

Workers publish their engines' block keys on their Serve stream (KvEvents: a snapshot when the stream opens, then
each step's stored and evicted keys); the index keeps key -> workers per engine version, and answers how many of
a request's leading prompt blocks each candidate holds. It holds no state of its own worth sharing: a restarted
scheduler (or another replica) rebuilds it from the snapshots its streams receive.
"""

from __future__ import annotations

import time

from llmserve.dispatch.v1 import worker_pb2

# How long a dispatched prompt's blocks count as held by its worker before the worker's own events confirm them:
# requests that share a new prefix and arrive together then follow the first one instead of scattering.
PREDICTION_TTL_S = 10.0


class KvIndex:
    def __init__(self) -> None:
        self._holders: dict[tuple[str, bytes], set[str]] = {}  # (engine version, key) -> worker ids
        self._held: dict[tuple[str, str], set[bytes]] = {}  # (worker id, engine version) -> keys
        self.block_sizes: dict[tuple[str, str], int] = {}  # (worker id, engine version) -> tokens per block
        # Predicted: (engine version, key) -> {worker id: until (monotonic)}, for blocks of prompts just dispatched.
        self._predicted: dict[tuple[str, bytes], dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def apply(self, worker_id: str, events: worker_pb2.KvEvents) -> None:
        version = events.model_version
        where = (worker_id, version)
        if events.reset:
            self._forget(where)
        if events.block_size:
            self.block_sizes[where] = events.block_size
        held = self._held.setdefault(where, set())
        for key in events.stored:
            held.add(key)
            self._holders.setdefault((version, key), set()).add(worker_id)
        for key in events.removed:
            held.discard(key)
            predicted = self._predicted.get((version, key))
            if predicted:
                predicted.pop(worker_id, None)
            holders = self._holders.get((version, key))
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[(version, key)]

    def _forget(self, where: tuple[str, str]) -> None:
        worker_id, version = where
        for key in self._held.pop(where, ()):
            holders = self._holders.get((version, key))
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[(version, key)]
        self.block_sizes.pop(where, None)
        for predicted in self._predicted.values():
            predicted.pop(worker_id, None)

    def predict(self, worker_id: str, version: str, keys: list[bytes], ttl_s: float = PREDICTION_TTL_S) -> None:
        """The worker is about to compute these blocks (a prompt dispatched to it): count them as its own for
        ttl_s, or until its events say otherwise."""
        until = time.monotonic() + ttl_s
        for key in keys:
            self._predicted.setdefault((version, key), {})[worker_id] = until
        if len(self._predicted) > 4 * len(self._holders) + 100_000:
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for where, workers in list(self._predicted.items()):
            for worker_id in [w for w, until in workers.items() if until < now]:
                del workers[worker_id]
            if not workers:
                del self._predicted[where]

    def _holding(self, version: str, key: bytes, now: float) -> set[str]:
        holders = self._holders.get((version, key), set())
        predicted = self._predicted.get((version, key))
        if not predicted:
            return holders
        return holders | {w for w, until in predicted.items() if until >= now}

    def drop_worker(self, worker_id: str) -> None:
        for where in [w for w in self._held if w[0] == worker_id]:
            self._forget(where)

    def block_size(self, worker_id: str, version: str) -> int:
        return self.block_sizes.get((worker_id, version), 0)

    def cached_prefix_blocks(self, version: str, keys: list[bytes], worker_ids: list[str]) -> dict[str, int]:
        """Leading blocks of `keys` (a prompt's chain) each worker holds for the engine `version`."""
        counts = dict.fromkeys(worker_ids, 0)
        matching = set(worker_ids)
        now = time.monotonic()
        for i, key in enumerate(keys):
            matching &= self._holding(version, key, now)
            if not matching:
                break
            for worker_id in matching:
                counts[worker_id] = i + 1
        return counts
