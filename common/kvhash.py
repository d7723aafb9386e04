"""The prefix-cache block keys, shared by the engine (worker/engine/paged/block_manager.py) and the scheduler's
KV-aware routing (scheduler/kvindex.py), so that both compute the same keys without the scheduler importing torch.

A block's key is a SHA-256 chain that starts from the sequence's cache salt (its tenant, and its LoRA adapter) and
covers every token from the start of the sequence: equal keys mean the same salt and the same tokens up to the
block's end, in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import struct

CHAIN_DOMAIN = b"llmserve.kv-prefix.v1\x00"


def chain_start(cache_salt: str) -> bytes:
    """The digest a sequence's chain starts from: SHA-256 of the domain tag and the UTF-8 salt."""
    return hashlib.sha256(CHAIN_DOMAIN + cache_salt.encode()).digest()


def hash_block(prev: bytes, token_ids: list[int]) -> bytes:
    """Key of a full block: SHA-256 of the previous block's key (or `chain_start`) and the block's token ids as
    little-endian uint32. Stable across processes and machines, so a router can compute or compare it."""
    return hashlib.sha256(prev + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def engine_salt(cache_salt: str, adapter: str = "") -> str:
    """The salt the engine chains from: the task's cache_salt, and the adapter's name for a LoRA adapter's rows
    (blocks computed with an adapter are shared only with the same adapter)."""
    return cache_salt if not adapter else f"{cache_salt}\x00lora:{adapter}"


def prompt_block_keys(token_ids: list[int], salt: str, block_size: int) -> list[bytes]:
    """Keys of the prompt's blocks that a prefix-cache hit can cover: the full blocks before its last token (the
    engine always computes at least the last prompt token, for the logits of the first generated one)."""
    keys: list[bytes] = []
    prev = chain_start(salt)
    for i in range((len(token_ids) - 1) // block_size if token_ids else 0):
        prev = hash_block(prev, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(prev)
    return keys
