"""The paged KV cache: fixed-size blocks of token slots, the block manager that hands them out, and the tensors.

Prefix caching: once a block is full and its K/V computed, it is keyed by a SHA-256 chain that starts from the
sequence's cache salt (its tenant) and covers every token from the start of the sequence, so equal keys mean the
same tenant and the same tokens up to the block's end. A later sequence of the same tenant whose prompt starts
with the same full blocks takes them by reference count instead of recomputing them; another tenant's equal
prompt shares nothing, so cached_tokens never tell one tenant what another has sent. The keys are a function of
(salt, prefix tokens) only, equal in every process (see `chain_start` and `hash_block`).
Free blocks wait in an LRU list: uncached ones are reused first, then cached ones least recently freed, and
reusing a cached block evicts its key.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from llmserve.common.kvhash import CHAIN_DOMAIN, chain_start, hash_block  # noqa: F401 (re-exported)

from .sequence import Sequence

# KV events kept for listeners between two drains (one engine step); beyond it they are dropped and the next drain
# asks for a snapshot instead.
MAX_PENDING_KV_EVENTS = 65536


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full and computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[bytes, int] = {}
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self.num_prefix_hit_tokens = 0  # prompt tokens served from the cache, over the manager's life
        # With listeners (KV-aware routing): (stored?, key) of each key added to or evicted from hash_to_block
        # since the last drain; None when nobody listens. Overflowing it sets kv_events_lost.
        self.kv_events: list[tuple[bool, bytes]] | None = None
        self.kv_events_lost = False

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding reusable computed prefixes (in use or free)."""
        return len(self.hash_to_block)

    # ---- prefix cache ----

    def block_hash(self, seq: Sequence, i: int) -> bytes:
        """Key of the sequence's full block i, hashed once per block and kept on the sequence (its tokens never
        change; a preempted sequence keeps them)."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            prev = hashes[-1] if hashes else chain_start(seq.cache_salt)
            hashes.append(hash_block(prev, seq.block_tokens(len(hashes), self.block_size)))
        return hashes[i]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks equal to the sequence's leading full blocks.

        At least one token stays uncomputed: its forward pass yields the logits for the next token. A sequence that
        still needs its prompt logits gets no hits: every prompt row must be computed.
        """
        if not self.enable_prefix_caching or seq.needs_prompt_logits:
            return []
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block.get(self.block_hash(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_blocks(self, seq: Sequence) -> None:
        """Key the sequence's full, computed blocks so that later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        for i in range(min(seq.num_computed_tokens // self.block_size, len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                key = self.block_hash(seq, i)
                if key in self.hash_to_block:  # an identical block computed by another sequence: keep that one
                    continue
                block.hash = key
                self.hash_to_block[key] = block.block_id
                self._note(True, key)

    def _note(self, stored: bool, key: bytes) -> None:
        events = self.kv_events
        if events is None:
            return
        if len(events) >= MAX_PENDING_KV_EVENTS:
            events.clear()
            self.kv_events_lost = True
        elif not self.kv_events_lost:
            events.append((stored, key))

    def drain_kv_events(self) -> tuple[list[bytes], list[bytes], bool]:
        """(stored, removed, lost) since the last drain, netted per key; lost: events were dropped, listeners
        need a snapshot (every key of hash_to_block) instead."""
        events, self.kv_events = self.kv_events or [], []
        lost, self.kv_events_lost = self.kv_events_lost, False
        final: dict[bytes, bool] = {}
        for stored, key in events:
            final[key] = stored
        return [k for k, s in final.items() if s], [k for k, s in final.items() if not s], lost

    # ---- the verbs the scheduler uses ----

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of a waiting sequence's tokens are available (cached prefix counted)."""
        hits = self._match_prefix(seq)
        num_hits_free = sum(self.blocks[b].ref_count == 0 for b in hits)
        return self.num_free_blocks - num_hits_free >= seq.num_blocks(self.block_size) - len(hits)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks; skip their compute."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:  # a resumed stream's generated tokens are not prompt tokens
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self.num_prefix_hit_tokens += seq.num_computed_tokens
        self._grow(seq)

    def can_append(self, seq: Sequence) -> bool:
        """Whether a running sequence's newest token fits (a new block is needed at block boundaries)."""
        return self.num_free_blocks >= seq.num_blocks(self.block_size) - len(seq.block_table)

    def append(self, seq: Sequence) -> None:
        self._grow(seq)

    def free(self, seq: Sequence) -> None:
        # Tail blocks go back first, so they are evicted before the shared heads of their chain.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []

    def _grow(self, seq: Sequence) -> None:
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the least recently freed cached block
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                    self._note(False, block.hash)
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)


# ---- the tensors ----

def kv_cache_shape(config, num_blocks: int, block_size: int) -> tuple[int, ...]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # [num_layers, k/v, num_blocks, block_size, num_kv_heads, head_dim]
    return (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, head_dim)


def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    shape = kv_cache_shape(config, 1, block_size)
    return int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def num_blocks_for_memory(config, block_size: int, dtype: torch.dtype, device: torch.device, fraction: float,
                          max_num_blocks: int | None = None) -> int:
    """Blocks that fit in `fraction` of the device's free memory, capped at `max_num_blocks`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_cache_fraction ({fraction}) must be in (0, 1]")
    num_blocks = int(free_memory_bytes(device) * fraction) // block_bytes(config, block_size, dtype)
    if max_num_blocks is not None:
        num_blocks = min(num_blocks, max_num_blocks)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_fraction {fraction} of free memory holds no KV block of {block_size} tokens")
    return num_blocks


def allocate_kv_cache(config, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    return torch.zeros(kv_cache_shape(config, num_blocks, block_size), dtype=dtype, device=device)
