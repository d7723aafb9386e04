"""The compute thread: jobs and loops run on one thread, in order, and failures reach the caller or are contained."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmserve.worker.engine.compute import ComputeThread


def test_jobs_run_in_order_on_one_thread_and_return_their_results():
    compute = ComputeThread(name="test-compute")
    futures = [compute.submit(lambda i=i: (i, threading.get_ident())) for i in range(20)]
    results = [f.result(timeout=5) for f in futures]
    assert [i for i, _ in results] == list(range(20))
    assert {ident for _, ident in results} == {compute.ident}
    assert compute.ident != threading.get_ident()


def test_a_failing_job_raises_in_its_caller_and_the_thread_goes_on():
    compute = ComputeThread(name="test-compute")
    with pytest.raises(ZeroDivisionError):
        compute.submit(lambda: 1 / 0).result(timeout=5)
    assert compute.submit(lambda: 42).result(timeout=5) == 42


def test_a_job_submitted_from_the_compute_thread_runs_at_once_instead_of_deadlocking():
    compute = ComputeThread(name="test-compute")
    outer = compute.submit(lambda: compute.submit(lambda: "inner").result(timeout=1))
    assert outer.result(timeout=5) == "inner"


class _Counter:
    """A loop with `todo` units of work; one fails."""

    def __init__(self, compute: ComputeThread, todo: int, fail_at: int | None = None):
        self.compute, self.todo, self.fail_at = compute, todo, fail_at
        self.done: list[int] = []
        self.threads: set[int] = set()
        self.finished = threading.Event()

    def has_work(self) -> bool:
        return self.todo > 0

    def run_once(self) -> None:
        self.threads.add(threading.get_ident())
        self.todo -= 1
        if self.todo == 0:
            self.finished.set()
        if self.fail_at is not None and self.todo == self.fail_at:
            raise RuntimeError("one step failed")
        self.done.append(self.todo)


def test_loops_take_turns_step_by_step_and_a_failing_step_does_not_stop_the_thread():
    compute = ComputeThread(name="test-compute")
    a, b = _Counter(compute, 50, fail_at=25), _Counter(compute, 50)
    with compute.cond:  # register both before either runs, so that they interleave
        compute.add_loop(a)
        compute.add_loop(b)
    assert a.finished.wait(5) and b.finished.wait(5)
    assert a.threads == b.threads == {compute.ident}
    assert len(a.done) == 49 and len(b.done) == 50  # only the failing unit is lost
    # jobs still run after a loop failed, and a loop that was removed is not called again
    compute.remove_loop(a)
    a.todo = 5
    compute.notify()
    assert compute.submit(lambda: "alive").result(timeout=5) == "alive"
    assert a.todo == 5


def test_call_awaits_a_job_from_asyncio():
    compute = ComputeThread(name="test-compute")

    async def main() -> int:
        return await compute.call(sum, [1, 2, 3])

    assert asyncio.run(main()) == 6
