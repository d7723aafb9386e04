"""The engine's step scheduler (not the scheduler service): which sequences run in the next forward pass, and how
many tokens each computes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """Scheduler -> model runner: the sequences of one step and the tokens each computes."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_sampled(self, i: int) -> bool:
        """Whether row i catches up with its tokens this step, so its logits give a new token."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class StepScheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # kept in serving order (priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        if seq.num_blocks(self.block_manager.block_size) > self.block_manager.num_blocks:
            raise ValueError(f"a sequence of {seq.num_tokens} tokens needs more KV blocks than the cache's "
                             f"{self.block_manager.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.sort_key)

    def schedule(self) -> ScheduledBatch:
        # The rule: every sequence has computed tokens that catch up with its total tokens (prompt, or prompt
        # plus sampled tokens), as many as a per-step token budget allows; there are no separate prefill and
        # decode phases. Sequences are served in (priority, arrival) order, running and waiting alike, so a
        # decode needs one token of budget and a long prompt takes what is left, in chunks. When KV blocks run
        # out, the running sequence last in that order is preempted (lowest class, most recent first): its
        # blocks are freed and it waits to recompute. A waiting sequence may only preempt a lower class, for
        # blocks or for a slot when max_num_seqs sequences run.
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        candidates = sorted(self.running + self.waiting, key=lambda s: s.sort_key)
        is_admitting = True  # closes at the first waiting sequence that cannot start, so none jumps the queue
        for seq in candidates:
            if budget == 0:
                break
            if seq in batch.preempted:
                continue
            if seq.status is SequenceStatus.RUNNING:
                while not self.block_manager.can_append(seq):
                    victim = self._victim(batch, worse_than=None)
                    assert victim is not None  # with worse_than None, seq itself is always a candidate
                    self._preempt(victim, batch)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                self.block_manager.append(seq)
            else:
                if not is_admitting:
                    continue
                # A full batch of running sequences makes room for a waiting sequence of a higher class: the
                # scheduler service sends an interactive task to a worker whose slots batch sequences hold, and
                # this is where the worker yields one of them (it recomputes later, from its cached blocks).
                while len(self.running) >= self.max_num_seqs:
                    victim = self._victim(batch, worse_than=seq)
                    if victim is None:
                        break
                    self._preempt(victim, batch)
                if len(self.running) >= self.max_num_seqs:
                    is_admitting = False
                    continue
                while not self.block_manager.can_allocate(seq):
                    victim = self._victim(batch, worse_than=seq)
                    if victim is None:
                        break
                    self._preempt(victim, batch)
                if not self.block_manager.can_allocate(seq):
                    is_admitting = False
                    continue
                self.block_manager.allocate(seq)
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
            num_new = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _victim(self, batch: ScheduledBatch, worse_than: Sequence | None) -> Sequence | None:
        """The running sequence to preempt: last in serving order and not yet scheduled in this step.

        For a running sequence that needs a block (worse_than None) the last one may be itself; a waiting
        sequence may only take blocks from a strictly lower priority class.
        """
        scheduled = {id(s) for s in batch.seqs}
        pool = [s for s in self.running if id(s) not in scheduled]
        if worse_than is not None:
            pool = [s for s in pool if s.priority > worse_than.priority]
        return max(pool, key=lambda s: s.sort_key, default=None)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.sort_key)

    def update(self, batch: ScheduledBatch) -> list[Sequence]:
        """Account for a step's computed tokens; return the sequences that caught up (their logits are sampled)."""
        caught_up = []
        for i, seq in enumerate(batch.seqs):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or aborted while the step ran
            is_sampled = batch.is_sampled(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.block_manager.cache_blocks(seq)
            if is_sampled:
                caught_up.append(seq)
        return caught_up

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted), running or waiting, and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
