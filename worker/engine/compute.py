"""The compute thread: one thread per worker process runs all of its torch work (engine steps, embedding batches,
model loads).

Why one: torch's CPU kernels run on an OpenMP thread team that belongs to the thread calling them, so every Python
thread that calls torch gets a team of its own, and on a machine with few cores a second team slows the busy one
severalfold. Measured on a 2-core machine (torch 2.13, libgomp): a 1-row decode step of SmolLM2-135M takes 38 ms
from the first thread that used torch and 61 ms from another thread; one [1, 1536] x [1536, 576] addmm 49 us
against 225 us. Funnelling everything through one thread also keeps an embedding batch from fighting a decode step
over the same cores: they take turns, between steps.

Two kinds of work run here:
  jobs    callables submitted with submit() / call(), run once each, in order;
  loops   objects with has_work() and run_once() (the paged engine's step): while any has work, the thread calls
          run_once() on each in turn, so several models on one worker share the cores step by step.
Both are checked under one condition variable (`cond`); a loop's has_work() runs under it, so a loop guards
the state it reads there (inboxes, flags) with the same condition and calls notify() after changing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Loop(Protocol):
    def has_work(self) -> bool:
        """Whether run_once() has something to do (called under ComputeThread.cond)."""
        ...

    def run_once(self) -> None:
        """One unit of work (one engine step); exceptions are logged, the thread goes on."""
        ...


class ComputeThread:
    def __init__(self, name: str = "llmserve-compute"):
        self.name = name
        self.cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._loops: list[Loop] = []
        self._thread: threading.Thread | None = None

    @property
    def ident(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    def _ensure_started(self) -> None:
        # called under self.cond
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run fn(*args) on the compute thread (after the step in progress); its result or exception in the future.
        Called from the compute thread itself it runs at once (a job that submits and waits would deadlock)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if threading.get_ident() == self.ident:
            _run_job(lambda: fn(*args), future)
            return future
        with self.cond:
            self._ensure_started()
            self._jobs.append((lambda: fn(*args), future))
            self.cond.notify()
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Await fn(*args) run on the compute thread."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def add_loop(self, loop: Loop) -> None:
        with self.cond:
            self._ensure_started()
            if loop not in self._loops:
                self._loops.append(loop)
            self.cond.notify()

    def remove_loop(self, loop: Loop) -> None:
        with self.cond:
            if loop in self._loops:
                self._loops.remove(loop)

    def notify(self) -> None:
        with self.cond:
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._jobs and not any(loop.has_work() for loop in self._loops):
                    self.cond.wait()
                jobs = list(self._jobs)
                self._jobs.clear()
                loops = list(self._loops)
            for fn, future in jobs:
                _run_job(fn, future)
            for loop in loops:
                with self.cond:
                    if not (loop in self._loops and loop.has_work()):
                        continue
                try:
                    loop.run_once()
                except Exception:  # a loop handles its own failures; this keeps the thread alive regardless
                    log.exception("compute loop failed")


def _run_job(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller
        future.set_exception(exc)


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process's compute thread (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
