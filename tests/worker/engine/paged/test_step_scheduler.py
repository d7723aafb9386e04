"""The per-step scheduler on its own: token budget, chunked prefill, continuous admission, preemption."""

from __future__ import annotations

import pytest

from llmserve.worker.engine.paged.block_manager import BlockManager
from llmserve.worker.engine.paged.sequence import Sequence, SequenceStatus
from llmserve.worker.engine.paged.step_scheduler import ScheduledBatch, StepScheduler

BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 64) -> StepScheduler:
    return StepScheduler(BlockManager(num_blocks, BLOCK_SIZE), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens)


def make_requests(*lengths: int, priority: int = 2, start: int = 0) -> list[Sequence]:
    # Distinct token values per request, so that the prefix cache plays no part unless a test wants it.
    return [Sequence([start + 1000 * i + t for t in range(n)], request_id=f"r{start + i}", priority=priority)
            for i, n in enumerate(lengths)]


def run_step(scheduler: StepScheduler, sampled_token: int = 7) -> ScheduledBatch:
    """schedule -> (pretend to) execute -> update, appending a token to each sequence that caught up."""
    batch = scheduler.schedule()
    for seq in scheduler.update(batch):
        seq.append_token(sampled_token)
    return batch


def scheduled(batch: ScheduledBatch) -> dict[str, int]:
    return {seq.request_id: n for seq, n in zip(batch.seqs, batch.num_new_tokens)}


def test_prompts_prefill_together_then_decode_one_token_each():
    scheduler = make_scheduler()
    for seq in make_requests(5, 9):
        scheduler.add(seq)
    assert scheduled(run_step(scheduler)) == {"r0": 5, "r1": 9}
    assert scheduled(run_step(scheduler)) == {"r0": 1, "r1": 1}
    assert [s.num_tokens for s in scheduler.running] == [7, 11]


def test_long_prompt_is_chunked_under_the_budget_while_decodes_keep_going():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    short, long = make_requests(3, 40)
    scheduler.add(short)
    run_step(scheduler)  # short prefilled, now decoding
    scheduler.add(long)
    chunks = []
    for _ in range(4):
        batch = run_step(scheduler)
        assert scheduled(batch)["r0"] == 1, "the decode runs in every step"
        assert batch.num_batched_tokens <= 16
        chunks.append(scheduled(batch).get("r1"))
    assert chunks == [15, 15, 10, 1]  # 40 prompt tokens in three chunks, then its first decode
    assert long.num_completion_tokens == 2  # sampled only once the prompt caught up (step 3), then step 4


def test_new_requests_join_the_running_batch_between_steps():
    scheduler = make_scheduler()
    first, second = make_requests(4, 4)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(second)
    assert scheduled(run_step(scheduler)) == {"r0": 1, "r1": 4}


def test_max_num_seqs_limits_the_running_rows_and_finished_ones_leave_at_once():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = make_requests(4, 4, 4)
    for seq in seqs:
        scheduler.add(seq)
    assert set(scheduled(run_step(scheduler))) == {"r0", "r1"}
    scheduler.finish(seqs[0])
    assert seqs[0].status is SequenceStatus.FINISHED and seqs[0].block_table == []
    assert scheduled(run_step(scheduler)) == {"r1": 1, "r2": 4}


def test_interactive_requests_are_admitted_first():
    scheduler = make_scheduler(max_num_seqs=1)
    batch_req = make_requests(4, priority=3)[0]
    interactive = make_requests(4, priority=1, start=10)[0]
    scheduler.add(batch_req)
    scheduler.add(interactive)
    assert list(scheduled(run_step(scheduler))) == ["r10"]


def test_running_out_of_blocks_preempts_the_most_recent_of_the_lowest_class():
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    a, b = make_requests(4, 4)  # one block each, full: their next token needs a second block
    c = make_requests(4, priority=3, start=2)[0]
    for seq in (a, b, c):
        scheduler.add(seq)
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 1
    batch = run_step(scheduler)  # three sequences need a new block each, one is free
    assert [s.request_id for s in batch.preempted] == ["r2"]  # the batch class goes first
    assert scheduled(batch) == {"r0": 1, "r1": 1}
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    assert scheduler.num_preemptions == 1


def test_within_a_class_the_most_recent_is_preempted():
    scheduler = make_scheduler(num_blocks=3)
    a, b = make_requests(4, 4)
    for seq in (a, b):
        scheduler.add(seq)
    run_step(scheduler)
    batch = run_step(scheduler)
    assert [s.request_id for s in batch.preempted] == ["r1"] and scheduled(batch) == {"r0": 1}


@pytest.mark.parametrize("enable_prefix_caching, num_recomputed", [(False, 5), (True, 1)])
def test_preempted_sequence_recomputes_its_tokens_and_continues(enable_prefix_caching, num_recomputed):
    scheduler = StepScheduler(BlockManager(3, BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching))
    a, b = make_requests(4, 4)
    for seq in (a, b):
        scheduler.add(seq)
    run_step(scheduler)
    run_step(scheduler)  # b preempted: 5 tokens (prompt + one sampled) to recompute
    assert b.status is SequenceStatus.WAITING and b.num_tokens == 5
    scheduler.finish(a)
    batch = run_step(scheduler)
    # With the prefix cache, b's full prompt block survived its preemption (freed, not yet evicted).
    assert scheduled(batch) == {"r1": num_recomputed}
    assert b.num_completion_tokens == 2


def test_waiting_request_preempts_only_a_lower_class():
    scheduler = make_scheduler(num_blocks=3)
    low = make_requests(8, priority=3)[0]
    scheduler.add(low)
    run_step(scheduler)
    same = make_requests(4, priority=3, start=5)[0]
    scheduler.add(same)
    batch = run_step(scheduler)
    assert not batch.preempted and same.status is SequenceStatus.WAITING
    interactive = make_requests(4, priority=1, start=9)[0]
    scheduler.add(interactive)
    batch = run_step(scheduler)
    assert [s.request_id for s in batch.preempted] == ["r0"]
    assert "r9" in scheduled(batch)


def test_a_higher_class_takes_a_slot_from_a_full_batch_of_lower_class_sequences():
    scheduler = make_scheduler(max_num_seqs=2)
    low = make_requests(4, 4, priority=3)
    for seq in low:
        scheduler.add(seq)
    run_step(scheduler)
    standard = make_requests(4, priority=3, start=5)[0]  # same class: waits for a slot, preempts nobody
    scheduler.add(standard)
    batch = run_step(scheduler)
    assert not batch.preempted and standard.status is SequenceStatus.WAITING
    interactive = make_requests(4, priority=1, start=9)[0]
    scheduler.add(interactive)
    batch = run_step(scheduler)
    assert [s.request_id for s in batch.preempted] == ["r1"]  # the most recent of the lowest class
    assert scheduled(batch) == {"r9": 4, "r0": 1}
    assert len(scheduler.running) == 2 and low[1].status is SequenceStatus.WAITING
    scheduler.finish(interactive)
    batch = run_step(scheduler)  # the slot comes back: the preempted sequence resumes before the later arrival
    assert "r1" in scheduled(batch) and standard.status is SequenceStatus.WAITING


def test_prefix_cache_hit_skips_the_shared_blocks():
    scheduler = make_scheduler()
    first = Sequence(list(range(10)), request_id="a")
    scheduler.add(first)
    run_step(scheduler)
    second = Sequence(list(range(8)) + [50, 51, 52], request_id="b")
    scheduler.add(second)
    assert scheduled(run_step(scheduler)) == {"a": 1, "b": 3}
    assert second.num_cached_tokens == 8


def test_finish_of_a_waiting_sequence_removes_it():
    scheduler = make_scheduler(max_num_seqs=1)
    a, b = make_requests(4, 4)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.finish(b)
    assert scheduler.waiting == [] and b.is_finished
    scheduler.finish(a)
    assert scheduler.is_finished and scheduler.block_manager.num_free_blocks == 64


def test_decode_rows_are_grouped_to_cut_padding():
    from llmserve.worker.engine.paged.model_runner import _length_groups
    assert _length_groups([]) == []
    assert _length_groups([100] * 8) == [(0, 8)]  # equal lengths: one group
    lengths = [20] * 16 + [700] * 16
    groups = _length_groups(lengths)
    assert groups == [(0, 16), (16, 32)]  # short rows are not padded to 700
    mixed = sorted([57, 91, 113, 117, 119, 158, 159, 166, 239, 272, 281, 304, 326, 333, 339, 354, 378, 382, 410,
                    430, 446, 460, 499, 504, 513, 532, 539, 561, 589, 613, 632, 649])
    groups = _length_groups(mixed)
    assert 1 < len(groups) <= 4 and groups[0][0] == 0 and groups[-1][1] == len(mixed)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    padded = sum((end - start) * mixed[end - 1] for start, end in groups)
    assert padded < 0.8 * len(mixed) * mixed[-1]
