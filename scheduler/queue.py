"""Per-model priority queues with aging, and fair turns between tenants inside each class.

Each model has one queue per priority class, and inside it one FIFO per tenant served in turns (TenantTurns). The
next task is the class head whose effective class is best, where a task climbs one class for every `aging_s` seconds
it has waited (ties go to the higher class, then the older task): interactive traffic goes first, yet a batch task
can never wait forever behind a stream of interactive ones.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import typing

from llmserve.common.priority import NUM_CLASSES
from llmserve.common.resume import Sent
from llmserve.dispatch.v1 import task_pb2

if typing.TYPE_CHECKING:
    from llmserve.scheduler.workers import WorkerConnection


@dataclasses.dataclass(eq=False)
class Entry:
    task: task_pb2.Task
    priority: int  # 1..3
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    # What the submitter receives: TaskDispatched, TaskOutput, or an exception to raise.
    outbox: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    worker: WorkerConnection | None = None  # once dispatched
    is_done: bool = False
    # Back-pressure: outputs buffered for a submitter that has stopped reading (its client stopped reading, so
    # gRPC flow control holds the Submit stream) are bounded; beyond max_backlog outputs, or with any backlog
    # unread for slow_consumer_timeout_s, the request is cancelled so that the worker stops generating for nobody.
    max_backlog: int = 1024
    slow_consumer_timeout_s: float = 30.0
    last_read: float = dataclasses.field(default_factory=time.monotonic)
    # Migration: what the submitter has of each choice (token ids and their text's length, in code points; the
    # outputs it got) and how often the task moved; on_lost is the dispatcher's handler for a lost worker.
    sent: Sent = dataclasses.field(default_factory=Sent)
    migrations: int = 0
    on_lost: typing.Callable[[Entry, str], None] | None = None
    original: task_pb2.Task | None = None  # the task as submitted (task is its resumed form after a migration)
    kv_keys: dict[int, list[bytes]] = dataclasses.field(default_factory=dict)  # block size -> prompt block keys
    engine: str = ""  # the version whose engine runs it on its worker (its slots are that engine's)
    prefill_tokens: int = 0  # prompt tokens its worker computes before its first output (routing's estimate)

    @property
    def request_id(self) -> str:
        return self.task.request_id

    @property
    def fairness_id(self) -> str:
        """Who the task is shared fairly with inside its class: its tenant (the cache salt the gateway sets)."""
        return self.task.cache_salt

    @property
    def weight(self) -> int:
        """Engine sequences the task occupies on its worker: its n choices (an embeddings call is one)."""
        return max(1, self.task.generate.n) if self.task.WhichOneof("input") == "generate" else 1

    def deliver(self, item: typing.Any) -> bool:
        """Queue an output for the submitter; False (and nothing queued) when it is too far behind."""
        backlog = self.outbox.qsize()
        if backlog >= self.max_backlog or (
                backlog and time.monotonic() - self.last_read > self.slow_consumer_timeout_s):
            return False
        self.outbox.put_nowait(item)
        return True

    async def read(self) -> typing.Any:
        """The submitter's next item (noting when it last read, for deliver())."""
        item = await self.outbox.get()
        self.last_read = time.monotonic()
        return item


class TenantTurns:
    """One priority class's waiting tasks, one FIFO per tenant (its fairness id: the task's cache_salt, which the
    gateway sets to the tenant's name), served in turns: the head is the oldest task of the tenant whose turn it
    is, and a tenant that was served goes to the back. One tenant's 100 queued requests delay another tenant's
    single request by at most one of them per tenant ahead of it, not by all 100."""

    def __init__(self) -> None:
        self.by_tenant: dict[str, collections.deque[Entry]] = {}
        self.turns: collections.deque[str] = collections.deque()

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_tenant.values())

    def __bool__(self) -> bool:
        return bool(self.turns)

    def __getitem__(self, i: int) -> Entry:
        if i != 0 or not self.turns:
            raise IndexError(i)
        return self.by_tenant[self.turns[0]][0]

    def __iter__(self) -> typing.Iterator[Entry]:
        for tenant in self.turns:
            yield from self.by_tenant[tenant]

    def append(self, entry: Entry) -> None:
        tenant = entry.fairness_id
        fifo = self.by_tenant.get(tenant)
        if fifo is None:
            fifo = self.by_tenant[tenant] = collections.deque()
            self.turns.append(tenant)
        fifo.append(entry)

    def appendleft(self, entry: Entry) -> None:
        """At the very front: the tenant's next task and the class's next turn (a migrated stream)."""
        tenant = entry.fairness_id
        fifo = self.by_tenant.setdefault(tenant, collections.deque())
        fifo.appendleft(entry)
        if tenant in self.turns:
            self.turns.remove(tenant)
        self.turns.appendleft(tenant)

    def popleft(self) -> Entry:
        tenant = self.turns.popleft()
        fifo = self.by_tenant[tenant]
        entry = fifo.popleft()
        if fifo:
            self.turns.append(tenant)  # served: its next task waits for the other tenants' turns
        else:
            del self.by_tenant[tenant]
        return entry

    def remove(self, entry: Entry) -> None:
        tenant = entry.fairness_id
        fifo = self.by_tenant.get(tenant)
        if fifo is None:
            raise ValueError("not queued")
        fifo.remove(entry)
        if not fifo:
            del self.by_tenant[tenant]
            self.turns.remove(tenant)

    def clear(self) -> None:
        self.by_tenant.clear()
        self.turns.clear()


class ModelQueue:
    def __init__(self, aging_s: float):
        self.aging_s = aging_s
        self.finished: collections.deque[float] = collections.deque()  # when tasks finished (monotonic), recent
        self.fifos: list[TenantTurns] = [TenantTurns() for _ in range(NUM_CLASSES)]

    def __len__(self) -> int:
        return sum(len(f) for f in self.fifos)

    def push(self, entry: Entry) -> None:
        self.fifos[entry.priority - 1].append(entry)

    def push_front(self, entry: Entry) -> None:
        """Back at the head of its class (a migrated task: its client is already waiting mid-stream)."""
        self.fifos[entry.priority - 1].appendleft(entry)

    def effective(self, entry: Entry, now: float) -> float:
        climbed = int((now - entry.enqueued) / self.aging_s) if self.aging_s > 0 else 0
        return entry.priority - climbed

    def peek(self) -> Entry | None:
        now = time.monotonic()
        heads = [f[0] for f in self.fifos if f]
        if not heads:
            return None
        return min(heads, key=lambda e: (self.effective(e, now), e.priority, e.enqueued))

    def pop(self) -> Entry | None:
        entry = self.peek()
        if entry is not None:
            self.fifos[entry.priority - 1].popleft()
        return entry

    def head_of_class(self, priority: int) -> Entry | None:
        """The next task of one class, by its tenants' turns (aging aside)."""
        fifo = self.fifos[priority - 1]
        return fifo[0] if fifo else None

    def pop_class(self, priority: int) -> Entry:
        return self.fifos[priority - 1].popleft()

    def ahead_of(self, entry: Entry) -> int:
        """About how many queued tasks a newly queued task waits behind: all of the higher classes, and, in its
        own class, one per other tenant for each task its own tenant has queued before it, plus one turn."""
        ahead = sum(len(f) for f in self.fifos[:entry.priority - 1])
        own_class = self.fifos[entry.priority - 1]
        mine = len(own_class.by_tenant.get(entry.fairness_id, ()))
        others = len(own_class.turns) - (1 if mine else 0)
        return ahead + min(len(own_class) - mine, others * (mine + 1)) + mine

    def remove(self, entry: Entry) -> bool:
        try:
            self.fifos[entry.priority - 1].remove(entry)
            return True
        except ValueError:
            return False

    def note_finished(self, now: float, window_s: float) -> None:
        self.finished.append(now)
        while self.finished and now - self.finished[0] > window_s:
            self.finished.popleft()

    def finish_rate(self, now: float, window_s: float, min_samples: int) -> float | None:
        """Tasks finished per second over the last window_s, or None with fewer than min_samples to go by."""
        while self.finished and now - self.finished[0] > window_s:
            self.finished.popleft()
        if len(self.finished) < min_samples:
            return None
        return len(self.finished) / max(now - self.finished[0], 1e-3)

    def drain(self) -> list[Entry]:
        entries = [e for f in self.fifos for e in f]
        for f in self.fifos:
            f.clear()
        return entries
