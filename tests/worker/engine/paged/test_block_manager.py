"""BlockManager: allocation, growth, freeing, and the prefix cache's hash chain, ref counts and LRU eviction."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import LlamaConfig

from llmserve.worker.engine.paged import block_manager
from llmserve.worker.engine.paged.block_manager import (
    BlockManager,
    allocate_kv_cache,
    block_bytes,
    num_blocks_for_memory,
)
from llmserve.worker.engine.paged.sequence import Sequence

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 8, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, BLOCK_SIZE, **kwargs)


def make_seq(tokens: list[int] | int, **kwargs) -> Sequence:
    return Sequence(list(range(100, 100 + tokens)) if isinstance(tokens, int) else tokens, **kwargs)


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """What a step does once the sequence's K/V are written: count them computed and key the full blocks."""
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_blocks(seq)


def test_allocate_gives_blocks_for_every_token_and_free_returns_them():
    manager = make_manager()
    seq = make_seq(9)
    assert manager.can_allocate(seq)
    manager.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert manager.num_free_blocks == 5 and seq.num_computed_tokens == 0
    manager.free(seq)
    assert manager.num_free_blocks == 8 and seq.block_table == []


def test_can_allocate_is_false_when_blocks_run_out():
    manager = make_manager(num_blocks=2)
    assert not manager.can_allocate(make_seq(9))
    assert manager.can_allocate(make_seq(8))


def test_append_takes_a_new_block_only_at_a_block_boundary():
    manager = make_manager(num_blocks=3)
    seq = make_seq(4)
    manager.allocate(seq)
    assert manager.num_free_blocks == 2
    seq.append_token(1)  # 5th token: needs a second block
    assert manager.can_append(seq)
    manager.append(seq)
    assert len(seq.block_table) == 2
    for token in range(3):  # tokens 6-8 fit in the second block
        seq.append_token(token)
        manager.append(seq)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 1
    seq.append_token(9)  # 9th token: third block
    manager.append(seq)
    assert manager.num_free_blocks == 0
    for token in range(3):
        seq.append_token(token)
        assert manager.can_append(seq)
    seq.append_token(9)  # 13th token: no block left
    assert not manager.can_append(seq)


def test_prefix_hit_shares_full_computed_blocks_by_reference():
    manager = make_manager()
    first = make_seq(10)
    manager.allocate(first)
    compute_all(manager, first)
    assert manager.num_cached_blocks == 2  # the two full blocks, not the partial third
    second = make_seq(list(range(100, 108)) + [7, 7, 7])  # same first 8 tokens
    manager.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert [manager.blocks[b].ref_count for b in second.block_table] == [2, 2, 1]
    assert manager.num_prefix_hit_tokens == 8


def test_prefix_chain_keys_on_everything_before_a_block():
    manager = make_manager()
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    manager.allocate(first)
    compute_all(manager, first)
    other = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # second block equal, first block different
    manager.allocate(other)
    assert other.num_computed_tokens == 0


def test_block_keys_are_sha256_of_the_salted_chain_equal_in_every_process():
    # Computed here from the definition alone: SHA-256 of the previous digest and the tokens as little-endian
    # uint32, starting from SHA-256 of a domain tag and the salt. No Python hash(), so any process (or a router)
    # gets the same keys.
    start = hashlib.sha256(b"llmserve.kv-prefix.v1\x00" + b"acme").digest()
    first = hashlib.sha256(start + b"".join(t.to_bytes(4, "little") for t in [1, 2, 3, 70000])).digest()
    second = hashlib.sha256(first + b"".join(t.to_bytes(4, "little") for t in [5, 6, 7, 8])).digest()
    manager = make_manager()
    seq = make_seq([1, 2, 3, 70000, 5, 6, 7, 8, 9], cache_salt="acme")
    manager.allocate(seq)
    compute_all(manager, seq)
    assert seq.block_hashes == [first, second]
    assert [manager.blocks[b].hash for b in seq.block_table[:2]] == [first, second]
    assert set(manager.hash_to_block) == {first, second}
    assert first.hex() == "d4979218ec548664cc0fb7444d84f00a0a5132b572891c5c202e51ae2d3d18bb"


def test_different_salts_share_no_blocks_and_the_same_salt_does():
    manager = make_manager(num_blocks=16)
    owner = make_seq(9, cache_salt="tenant-a")
    manager.allocate(owner)
    compute_all(manager, owner)
    for salt in ("tenant-b", "", "tenant-a\x00"):
        intruder = make_seq(9, cache_salt=salt)
        manager.allocate(intruder)
        assert intruder.num_computed_tokens == 0 and intruder.num_cached_tokens == 0
        compute_all(manager, intruder)
        assert len(intruder.block_hashes) == 2 and not set(intruder.block_hashes) & set(owner.block_hashes)
        assert not set(intruder.block_table) & set(owner.block_table)
    again = make_seq(9, cache_salt="tenant-a")
    manager.allocate(again)
    assert again.num_cached_tokens == 8 and again.block_table[:2] == owner.block_table[:2]


def test_each_full_block_is_hashed_once_however_often_it_is_looked_up(monkeypatch):
    calls = []
    real = block_manager.hash_block
    monkeypatch.setattr(block_manager, "hash_block", lambda prev, tokens: calls.append(tokens) or real(prev, tokens))
    manager = make_manager(num_blocks=16)
    first = make_seq(13)
    manager.allocate(first)
    for _ in range(3):  # a step per prompt chunk: each keys the blocks computed so far
        first.num_computed_tokens = min(first.num_computed_tokens + 5, first.num_tokens)
        manager.cache_blocks(first)
    assert len(calls) == 3
    waiting = make_seq(13)
    for _ in range(4):  # a waiting sequence is checked every step until it is admitted
        assert manager.can_allocate(waiting)
    manager.allocate(waiting)
    compute_all(manager, waiting)
    manager.cache_blocks(waiting)
    assert len(calls) == 6 and waiting.num_cached_tokens == 12


def test_an_uncomputed_block_is_never_shared():
    manager = make_manager()
    first = make_seq(9)
    manager.allocate(first)  # allocated, K/V not computed yet
    second = make_seq(9)
    manager.allocate(second)
    assert second.num_computed_tokens == 0


def test_whole_prompt_hit_still_leaves_one_token_to_compute():
    manager = make_manager()
    first = make_seq(8)
    manager.allocate(first)
    compute_all(manager, first)
    again = make_seq(8)
    manager.allocate(again)
    assert again.num_computed_tokens == 4  # the last block holds the token whose logits are needed


def test_freed_cached_blocks_survive_until_evicted_least_recently_freed_first():
    manager = make_manager(num_blocks=4)
    old = make_seq(list(range(8)) + [99])
    manager.allocate(old)
    compute_all(manager, old)
    manager.free(old)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    hit = make_seq(list(range(8)) + [42])
    assert manager.can_allocate(hit)
    manager.allocate(hit)
    assert hit.num_computed_tokens == 8 and manager.num_free_blocks == 1
    manager.free(hit)
    # Uncached free blocks are used first; the cached ones go in LRU order, tail of the chain first.
    filler = make_seq(4)
    manager.allocate(filler)
    assert manager.num_cached_blocks == 2
    big = make_seq(12)
    manager.allocate(big)
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == 0


def test_can_allocate_counts_cached_free_blocks_it_would_take():
    manager = make_manager(num_blocks=3)
    old = make_seq(9)
    manager.allocate(old)
    compute_all(manager, old)
    manager.free(old)
    again = make_seq(9)  # two blocks from the cache + one new block: fits in 3
    assert manager.can_allocate(again)
    manager.allocate(again)
    assert manager.num_free_blocks == 0 and again.num_computed_tokens == 8


def test_prefix_caching_can_be_turned_off():
    manager = make_manager(enable_prefix_caching=False)
    first = make_seq(9)
    manager.allocate(first)
    compute_all(manager, first)
    second = make_seq(9)
    manager.allocate(second)
    assert second.num_computed_tokens == 0 and manager.num_cached_blocks == 0


def test_kv_tensors_are_sized_from_a_block_count_or_a_memory_fraction():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    cache = allocate_kv_cache(config, 10, 16, torch.float32, torch.device("cpu"))
    assert cache.shape == (2, 2, 10, 16, 2, 16)
    assert block_bytes(config, 16, torch.float32) == 2 * 2 * 16 * 2 * 16 * 4
    assert num_blocks_for_memory(config, 16, torch.float32, torch.device("cpu"), 0.01, max_num_blocks=7) == 7
    assert num_blocks_for_memory(config, 16, torch.float32, torch.device("cpu"), 0.001) > 7
    with pytest.raises(ValueError):
        num_blocks_for_memory(config, 16, torch.float32, torch.device("cpu"), 1.5)
