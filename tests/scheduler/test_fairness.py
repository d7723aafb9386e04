"""Fair turns between tenants inside a priority class: one tenant's 100 queued requests do not delay another
tenant's single request behind all of them (the real Dispatcher, with the workers' network side doubled)."""

from __future__ import annotations

import time

from llmserve.dispatch.v1 import task_pb2
from llmserve.scheduler.queue import Entry, ModelQueue
from tests.scheduler.test_dispatcher import MODEL, Harness, settle


def _entry(request_id: str, tenant: str, priority: int = 2, waited_s: float = 0.0) -> Entry:
    task = task_pb2.Task(request_id=request_id, model_version=MODEL, cache_salt=tenant,
                         generate=task_pb2.GenerateInput(prompt="hi"))
    return Entry(task, priority=priority, enqueued=time.monotonic() - waited_s)


async def test_a_single_request_is_not_queued_behind_another_tenants_hundred():
    h = Harness(max_queue_per_model=200)
    h.dispatcher.start()
    try:
        w = h.workers(a=1)["a"]
        for i in range(100):
            h.dispatcher.submit(_entry(f"a{i}", "tenant-a"))
        await settle()
        h.dispatcher.submit(_entry("b0", "tenant-b"))
        await settle()
        assert w.task_ids == ["a0"]
        for _ in range(4):
            w.finish(w.task_ids[-1])
            await settle()
        # Turns alternate: b's request waits for at most one more of a's (its turn came first), not for 99.
        assert w.task_ids == ["a0", "a1", "b0", "a2", "a3"]
    finally:
        await h.dispatcher.stop()


def test_turns_rotate_per_class_and_priority_and_aging_still_rule_across_classes():
    queue = ModelQueue(aging_s=2.0)
    for i in range(3):
        queue.push(_entry(f"a{i}", "a"))
    queue.push(_entry("b0", "b"))
    queue.push(_entry("c0", "c"))
    queue.push(_entry("i0", "a", priority=1))
    order = [queue.pop().request_id for _ in range(6)]
    assert order == ["i0", "a0", "b0", "c0", "a1", "a2"]
    queue.push(_entry("old-batch", "z", priority=3, waited_s=4.5))  # climbed two classes
    queue.push(_entry("x", "x", priority=2))
    assert queue.pop().request_id == "old-batch"
    migrated = _entry("m", "b")
    queue.push(_entry("y", "y"))
    queue.push_front(migrated)
    assert queue.pop() is migrated and queue.remove(queue.peek()) and queue.pop().request_id == "y"
    assert queue.pop() is None and len(queue) == 0
