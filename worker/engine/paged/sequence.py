"""Engine-side state of one request: its tokens, how many of them have K/V in the cache, and its blocks.

The one number that drives scheduling is `num_computed_tokens`: the tokens whose K/V sit in the paged cache.
A step computes some of the remaining `num_tokens - num_computed_tokens` (a prompt chunk, or the one token
sampled last step); once they catch up, the step's logits give the next token. Prefix-cache hits and
preemption (which resets the count to zero, to recompute later) move the same number.
"""

from __future__ import annotations

import enum
import itertools
import typing
from typing import Any

import torch

if typing.TYPE_CHECKING:
    from ..detokenizer import IncrementalDetokenizer, StopMatcher
    from .engine import _Stream
    from .lora import Adapter
    from .sampler import RowProcessing

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: Any = None, *, request_id: str | None = None,
                 priority: int = 2, cache_salt: str = "", adapter: Adapter | None = None):
        self.seq_id = next(_seq_ids)  # arrival order: older sequences win ties of priority
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_table: list[int] = []
        self.cache_salt = cache_salt  # prefix-cache partition (the tenant); never logged or shown in repr
        self.adapter = adapter  # LoRA adapter applied to this sequence's rows (None: the base model)
        self.block_hashes: list[bytes] = []  # prefix-cache keys of the leading full blocks, each computed once
        self.status = SequenceStatus.WAITING
        self.priority = priority  # 1 interactive, 2 standard, 3 batch: lower numbers are served and kept first
        self.params = params  # SamplingParams (or None in scheduler tests)
        self.num_preemptions = 0
        seed = getattr(params, "seed", None)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # Set by the engine: text streaming and stop strings (kept here so that the sequence is the one record).
        self.detokenizer: IncrementalDetokenizer = None  # type: ignore[assignment]
        self.stop_matcher: StopMatcher = None  # type: ignore[assignment]
        self.stream: _Stream = None  # type: ignore[assignment]
        self.finish_reason: str | None = None
        # Log probabilities (params.logprobs / prompt_logprobs): generated tokens' entries not yet emitted, and the
        # prompt's entries, filled as its chunks are computed and emitted once with the first output.
        self.pending_logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.prompt_logprobs_sent = False
        # Migration: generated token ids already handed out in outputs, tokens to resume from (a stream moved from
        # a lost worker), and the text of those tokens that had not reached the client yet.
        self.num_tokens_sent = 0
        self.resume_token_ids: list[int] = []
        self.resume_text_length = 0
        self.held_text = ""
        # Set by the engine when the sampling parameters ask for logit changes (sampler.RowProcessing: logit_bias,
        # penalties, min_tokens, a grammar); dead_end once the grammar allows no token.
        self.processing: RowProcessing | None = None
        self.dead_end = False

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether the prompt's logits are still wanted: the runner returns every prompt row of this sequence's
        chunks, and the prefix cache gives it no hits (their rows would never be computed)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int]:
        """Serving order: priority class, then arrival."""
        return self.priority, self.seq_id

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold every token's K/V."""
        return (self.num_tokens + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
