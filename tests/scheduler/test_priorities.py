"""Priorities across the mesh: a task finding no free slot takes one a lower class holds (the worker's engine
preempts it), free slots still go by aging, per-class queue caps, and deadlines refused early. The real Dispatcher
and WorkerConnection, with each worker's Serve stream replaced by local queues (the TEST DOUBLE of
test_dispatcher.py)."""

from __future__ import annotations

import time

import grpc
import pytest

from llmserve.common.errors import ServiceError
from tests.scheduler.test_dispatcher import MODEL, Harness, settle

BATCH, STANDARD, INTERACTIVE = 3, 2, 1


@pytest.fixture
def make_harness(make):
    """As tests/scheduler/conftest.py's make, with room in the model's queue for every test here."""
    def build(**kwargs) -> Harness:
        kwargs.setdefault("max_queue_per_model", 64)
        return make(**kwargs)
    return build


async def test_an_interactive_task_takes_a_slot_batch_sequences_hold(make_harness):
    h = make_harness()
    w = h.workers(a=2)["a"]
    h.submit("b1", BATCH), h.submit("b2", BATCH)
    await settle()
    h.submit("b3", BATCH)  # no free slot and nothing below batch: it waits
    h.submit("i1", INTERACTIVE)
    await settle()
    assert w.task_ids == ["b1", "b2", "i1"]  # i1 sent over the full worker: its engine preempts a batch sequence
    assert [e.request_id for e in h.dispatcher.queues[MODEL].fifos[BATCH - 1]] == ["b3"]
    h.submit("s1", STANDARD)  # one batch slot is still held by batch: standard may take it too
    h.submit("i2", INTERACTIVE)
    await settle()
    assert w.task_ids == ["b1", "b2", "i1", "i2"]  # i2 first (its class), then nothing: both slots are higher now
    assert w.room_by_preemption(MODEL, STANDARD) == 0 and w.room_by_preemption(MODEL, INTERACTIVE) == 0
    h.submit("i3", INTERACTIVE)
    await settle()
    assert "i3" not in w.task_ids  # interactive never preempts interactive
    w.finish("i1")
    await settle()
    assert w.task_ids[-1] == "i3"  # the freed slot goes to the best class waiting


async def test_without_preemption_the_interactive_task_waits_for_a_free_slot(make_harness):
    h = make_harness(preemption=False)
    w = h.workers(a=2)["a"]
    h.submit("b1", BATCH), h.submit("b2", BATCH)
    await settle()
    h.submit("i1", INTERACTIVE)
    await settle()
    assert w.task_ids == ["b1", "b2"]
    w.finish("b1")
    await settle()
    assert w.task_ids == ["b1", "b2", "i1"]


async def test_a_free_slot_elsewhere_is_taken_before_preempting(make_harness):
    h = make_harness()
    w = h.workers(a=2, b=3)
    for name in ("b1", "b2", "b3", "b4"):
        h.submit(name, BATCH)
    await settle()
    assert len(w["a"].task_ids) + len(w["b"].task_ids) == 4  # one slot free, on one of them
    free = w["a"] if w["a"].room(MODEL) else w["b"]
    h.submit("i1", INTERACTIVE)
    await settle()
    assert free.task_ids[-1] == "i1" and free.room(MODEL) == 0


async def test_an_aged_batch_task_keeps_its_claim_on_the_next_free_slot(make_harness):
    h = make_harness(aging_s=0.05)
    w = h.workers(a=1)["a"]
    h.submit("b1", BATCH)
    await settle()
    old = h.submit("old", BATCH)
    old.enqueued -= 1.0  # waited 20 aging periods: it outranks any fresh task for a free slot
    h.submit("i1", INTERACTIVE)
    await settle()
    assert w.task_ids == ["b1", "i1"]  # the interactive task preempts b1; it does not wait behind the aged one
    h.submit("s1", STANDARD)  # the one slot is interactive's now: standard cannot take it
    await settle()
    assert w.task_ids == ["b1", "i1"]
    w.finish("b1")
    w.finish("i1")
    await settle()
    assert w.task_ids[-1] == "old"  # the free slot: aged batch before the fresher standard task
    sent = [r.task for r in w.sent if r.WhichOneof("kind") == "task"][-1]
    assert sent.priority == INTERACTIVE  # it runs in the class it climbed to: the standard task cannot preempt it
    await settle()
    assert w.task_ids[-1] == "old" and w.room_by_preemption(MODEL, STANDARD) == 0


async def test_a_full_class_queue_refuses_that_class_only(make_harness):
    h = make_harness(max_queue_per_class=[1, 0, 2])
    h.workers(a=1)
    h.submit("i0", INTERACTIVE)
    await settle()
    h.submit("i1", INTERACTIVE)  # queued (interactive never preempts interactive)
    with pytest.raises(ServiceError) as refused:
        h.submit("i2", INTERACTIVE)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PRIORITY_INTERACTIVE queue" in refused.value.message and "(1 tasks)" in refused.value.message
    for i in range(5):  # standard: no class cap, only the model's
        h.submit(f"s{i}", STANDARD)
    h.submit("b0", BATCH), h.submit("b1", BATCH)
    with pytest.raises(ServiceError):
        h.submit("b2", BATCH)


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(make_harness):
    h = make_harness()
    w = h.workers(a=1)["a"]
    h.submit("running", STANDARD)
    await settle()
    queue = h.dispatcher.queues[MODEL]
    now = time.monotonic()
    queue.finished.extend(now - 10 + i for i in range(10))  # tasks of this model finished at 1/s lately
    for i in range(4):
        h.submit(f"queued{i}", STANDARD)
    with pytest.raises(ServiceError) as refused:
        h.submit("late", STANDARD, deadline_ms=time.time() * 1000 + 2000)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.message
    assert "deadline cannot be met" in message and "5 task(s) are ahead" in message and "leaves 2.0 s" in message
    assert "late" not in [e.request_id for e in queue.fifos[STANDARD - 1]]
    h.submit("roomy", STANDARD, deadline_ms=time.time() * 1000 + 20_000)  # time enough: queued
    h.submit("urgent", INTERACTIVE, deadline_ms=time.time() * 1000 + 2000)  # nothing ahead in its class: preempts
    await settle()
    assert w.task_ids == ["running", "urgent"]


def test_another_tenant_waits_behind_one_turn_not_the_whole_flood():
    from llmserve.dispatch.v1 import task_pb2
    from llmserve.scheduler.queue import Entry, ModelQueue
    queue = ModelQueue(aging_s=2.0)
    for i in range(100):
        queue.push(Entry(task_pb2.Task(request_id=f"a{i}", cache_salt="tenant-a"), priority=STANDARD))
    single = Entry(task_pb2.Task(request_id="b0", cache_salt="tenant-b"), priority=STANDARD)
    assert queue.ahead_of(single) == 1  # the estimate the deadline check uses
    queue.push(single)
    assert [queue.pop().request_id for _ in range(2)] == ["a0", "b0"]
