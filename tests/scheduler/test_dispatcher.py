"""The dispatcher's rules without channels: the real Dispatcher and WorkerConnection, with each worker's Serve
stream replaced by local queues (WorkerConnectionDouble, a TEST DOUBLE of the network side only)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from llmserve.common.errors import ServiceError
from llmserve.dispatch.v1 import scheduler_pb2, task_pb2, worker_pb2
from llmserve.scheduler.dispatcher import Dispatcher
from llmserve.scheduler.queue import Entry, ModelQueue
from llmserve.scheduler.workers import WorkerConnection

MODEL = "m-v1"


class WorkerConnectionDouble(WorkerConnection):
    """TEST DOUBLE: WorkerConnection whose Serve stream is two local queues instead of a gRPC call to a worker."""

    def __init__(self, info: worker_pb2.WorkerInfo, on_change, answers: bool = True):
        self.responses: asyncio.Queue[worker_pb2.ServeResponse | None] = asyncio.Queue()
        self.sent: list[worker_pb2.ServeRequest] = []
        super().__init__(info, on_change)
        if answers:  # as a real worker does when the stream opens
            self.report(num_running=0)

    async def _serve(self):
        async def record() -> None:
            async for request in self._requests():
                self.sent.append(request)

        recorder = asyncio.create_task(record())
        try:
            while (message := await self.responses.get()) is not None:
                yield message
        finally:
            recorder.cancel()

    def finish(self, request_id: str) -> None:
        self.responses.put_nowait(worker_pb2.ServeResponse(
            output=task_pb2.TaskOutput(request_id=request_id, finished=True, finish_reason="stop")))

    def report(self, num_running: int, num_waiting: int = 0) -> None:
        self.responses.put_nowait(worker_pb2.ServeResponse(load=task_pb2.LoadReport(
            worker_id=self.worker_id, models=[task_pb2.ModelLoad(model_version=MODEL, num_running=num_running,
                                                                 num_waiting=num_waiting)])))

    def break_stream(self) -> None:
        self.responses.put_nowait(None)

    @property
    def task_ids(self) -> list[str]:
        return [r.task.request_id for r in self.sent if r.WhichOneof("kind") == "task"]


class Harness:
    def __init__(self, **kwargs):
        self.connections: list[WorkerConnectionDouble] = []
        self.answers = True  # whether new connections' workers answer (send their first load report)
        kwargs.setdefault("max_queue_per_model", 8)
        kwargs.setdefault("aging_s", 2.0)
        self.dispatcher = Dispatcher(connect=self._connect, reconnect_delay_s=0.05, **kwargs)

    def _connect(self, info, on_change) -> WorkerConnectionDouble:
        conn = WorkerConnectionDouble(info, on_change, answers=self.answers)
        self.connections.append(conn)
        return conn

    def workers(self, **capacities: int) -> dict[str, WorkerConnectionDouble]:
        members = {name: worker_pb2.WorkerInfo(worker_id=name, address=f"127.0.0.1:{1000 + i}",
                                               models=[worker_pb2.WorkerModel(model_version=MODEL, max_num_seqs=c)])
                   for i, (name, c) in enumerate(capacities.items())}
        self.dispatcher.sync_members(members)
        return {name: self.dispatcher.workers[name] for name in capacities}  # type: ignore[misc]

    def submit(self, request_id: str, priority: int = 2, deadline_ms: float = 0, n: int = 1) -> Entry:
        task = task_pb2.Task(request_id=request_id, model_version=MODEL, priority=priority,
                             deadline_unix_ms=int(deadline_ms),
                             generate=task_pb2.GenerateInput(prompt="hi", n=n))
        entry = Entry(task, priority=priority)
        self.dispatcher.submit(entry)
        return entry


@pytest.fixture
async def harness():
    h = Harness()
    h.dispatcher.start()
    yield h
    await h.dispatcher.stop()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def next_item(entry: Entry, timeout_s: float = 2.0):
    """The next TaskOutput or error the submitter gets (TaskDispatched notes are skipped)."""
    while True:
        item = await asyncio.wait_for(entry.outbox.get(), timeout_s)
        if not isinstance(item, scheduler_pb2.TaskDispatched):
            return item


async def test_least_utilised_worker_gets_the_next_task(harness):
    w = harness.workers(a=4, b=4)
    harness.submit("t1")
    harness.submit("t2")
    await settle()
    assert sorted(w["a"].task_ids + w["b"].task_ids) == ["t1", "t2"]
    assert len(w["a"].task_ids) == len(w["b"].task_ids) == 1  # spread, not stacked
    # b reports sequences it holds for someone else: a, now less busy, gets the next task.
    w["b"].report(num_running=3)
    await settle()
    harness.submit("t3")
    await settle()
    assert "t3" in w["a"].task_ids


async def test_no_task_goes_to_a_worker_without_room(harness):
    w = harness.workers(a=1)
    first, second = harness.submit("t1"), harness.submit("t2")
    await settle()
    assert w["a"].task_ids == ["t1"] and len(harness.dispatcher.queues[MODEL]) == 1
    w["a"].finish("t1")
    assert (await next_item(first)).request_id == "t1"
    await settle()
    assert w["a"].task_ids == ["t1", "t2"]
    dispatched = await asyncio.wait_for(second.outbox.get(), 1)
    assert isinstance(dispatched, scheduler_pb2.TaskDispatched) and dispatched.worker_id == "a"


async def test_a_task_of_n_choices_takes_n_slots_on_one_worker(harness):
    w = harness.workers(a=4)
    harness.submit("one")
    wide = harness.submit("wide", n=4)  # 1 + 4 > 4: waits for the whole room, with those behind it
    behind = harness.submit("behind")
    await settle()
    assert w["a"].task_ids == ["one"] and w["a"].room(MODEL) == 3
    w["a"].finish("one")
    await settle()
    assert w["a"].task_ids == ["one", "wide"] and w["a"].room(MODEL) == 0 and not wide.is_done
    w["a"].finish("wide")
    await settle()
    assert w["a"].task_ids == ["one", "wide", "behind"] and w["a"].room(MODEL) == 3
    assert not behind.is_done
    # n beyond a worker's capacity is not stuck forever: it runs alone on an idle worker (which refuses it
    # with the limit if its engine cannot take it).
    w["a"].finish("behind")
    harness.submit("huge", n=9)
    await settle()
    assert w["a"].task_ids[-1] == "huge" and w["a"].room(MODEL) <= 0


async def test_a_deadline_that_passes_in_the_queue_fails_the_task(harness):
    w = harness.workers(a=1)
    harness.submit("busy")
    late = harness.submit("late", deadline_ms=time.time() * 1000 + 50)
    await asyncio.sleep(0.1)
    w["a"].finish("busy")
    item = await next_item(late)
    assert item.code == grpc.StatusCode.DEADLINE_EXCEEDED and "queued" in item.message
    assert w["a"].task_ids == ["busy"]


async def test_submit_without_a_worker_or_over_the_queue_cap_is_refused():
    h = Harness(max_queue_per_model=1)
    with pytest.raises(ServiceError) as err:
        h.submit("t0")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and MODEL in err.value.message
    h.workers(a=1)
    h.submit("t1")  # stays queued: this dispatcher's loop is not running
    with pytest.raises(ServiceError) as err:
        h.submit("t2")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.value.message
    await h.dispatcher.stop()


async def test_broken_stream_fails_its_tasks_and_the_worker_is_reconnected(harness):
    w = harness.workers(a=2)
    lost = harness.submit("t1")
    await settle()
    w["a"].break_stream()
    item = await next_item(lost)
    assert item.code == grpc.StatusCode.UNAVAILABLE and "went away" in item.message
    assert "a" not in item.message.split() and "127.0.0.1" not in item.message  # no worker id or address
    for _ in range(50):  # reconnect_delay_s is 0.05
        if len(harness.connections) == 2 and harness.dispatcher.workers["a"].is_alive:
            break
        await asyncio.sleep(0.02)
    assert len(harness.connections) == 2 and harness.dispatcher.workers["a"] is harness.connections[1]
    harness.submit("t2")
    await settle()
    assert harness.connections[1].task_ids == ["t2"]


async def test_a_worker_leaving_membership_fails_what_waits_for_it(harness):
    harness.workers(a=1)
    harness.submit("running")
    queued = harness.submit("queued")
    await settle()
    harness.dispatcher.sync_members({})
    item = await next_item(queued)
    assert item.code == grpc.StatusCode.UNAVAILABLE


async def test_tasks_wait_for_a_worker_that_comes_back():
    """A worker crashed and restarts (seconds): what was queued and what arrives meanwhile waits for it."""
    h = Harness(worker_wait_s=5.0)
    h.dispatcher.start()
    try:
        h.workers(a=1)
        h.submit("running")
        queued = h.submit("queued")
        await settle()
        h.dispatcher.sync_members({})  # its lease expired
        arriving = h.submit("arriving")  # accepted: the model had a worker a moment ago
        await asyncio.sleep(0.1)
        assert queued.outbox.empty() and arriving.outbox.empty()
        back = h.workers(a=2)["a"]
        await settle()
        assert back.task_ids == ["queued", "arriving"]
    finally:
        await h.dispatcher.stop()


async def test_tasks_waiting_for_a_worker_fail_when_none_comes_back_in_time():
    h = Harness(worker_wait_s=0.2)
    h.dispatcher.start()
    try:
        with pytest.raises(ServiceError):
            h.submit("never-served")  # no worker ever served the model: no wait
        h.workers(a=1)
        h.submit("running")
        queued = h.submit("queued")
        await settle()
        h.dispatcher.sync_members({})
        started = time.monotonic()
        item = await next_item(queued)
        assert item.code == grpc.StatusCode.UNAVAILABLE and 0.15 < time.monotonic() - started < 1.0
        with pytest.raises(ServiceError) as err:
            h.submit("late")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await h.dispatcher.stop()


async def test_a_redialled_worker_gets_tasks_only_once_it_answers(harness):
    """Redialling a worker that is still down used to take tasks at once and lose them when the dial failed."""
    w = harness.workers(a=1)
    harness.answers = False
    w["a"].break_stream()
    for _ in range(50):  # reconnect_delay_s is 0.05
        if len(harness.connections) == 2:
            break
        await asyncio.sleep(0.02)
    redial = harness.connections[1]
    entry = harness.submit("t1")
    await settle()
    assert redial.task_ids == [] and entry.outbox.empty()
    redial.report(num_running=0)  # the worker answers
    await settle()
    assert redial.task_ids == ["t1"]


def test_aging_bounds_how_long_a_batch_task_waits_behind_interactive_traffic():
    aging_s = 2.0
    queue = ModelQueue(aging_s)
    now = time.monotonic()

    def entry(name: str, priority: int, waited_s: float) -> Entry:
        return Entry(task_pb2.Task(request_id=name), priority=priority, enqueued=now - waited_s)

    batch = entry("batch", 3, waited_s=2 * aging_s + 0.5)  # climbed two classes: ties with interactive
    queue.push(batch)
    for i in range(3):
        queue.push(entry(f"i{i}", 1, waited_s=0))
    assert queue.pop().request_id == "i0"  # a tie goes to the higher class
    queue.fifos[2][0].enqueued = now - 3 * aging_s - 0.5  # one more aging period: it outranks fresh interactive
    assert queue.pop() is batch
    assert [queue.pop().request_id for _ in range(2)] == ["i1", "i2"] and queue.pop() is None


def _token(request_id: str, text: str = "x") -> worker_pb2.ServeResponse:
    return worker_pb2.ServeResponse(output=task_pb2.TaskOutput(request_id=request_id, text_delta=text))


async def test_a_caller_that_stops_reading_is_cancelled_on_the_worker_instead_of_buffered(harness):
    w = harness.workers(a=4)["a"]
    entry = harness.submit("slow")
    entry.max_backlog = 50
    await settle()
    assert w.task_ids == ["slow"]
    for _ in range(200):  # the worker generates; nobody reads
        w.responses.put_nowait(_token("slow"))
    await settle()
    # bounded: the backlog stopped at the limit (+ the dispatched note and the error), and the worker was told
    assert entry.outbox.qsize() <= 52
    cancels = [r.cancel.request_id for r in w.sent if r.WhichOneof("kind") == "cancel"]
    assert cancels == ["slow"]
    assert w.room(MODEL) == 4  # its slot is free again
    items = [entry.outbox.get_nowait() for _ in range(entry.outbox.qsize())]
    assert isinstance(items[-1], ServiceError) and items[-1].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "not read" in items[-1].message


async def test_a_backlog_left_unread_past_the_timeout_cancels_but_a_reader_keeps_going(harness):
    w = harness.workers(a=4)["a"]
    slow, fast = harness.submit("slow"), harness.submit("fast")
    slow.slow_consumer_timeout_s = fast.slow_consumer_timeout_s = 0.2
    await settle()
    await fast.read()  # the dispatched note
    w.responses.put_nowait(_token("slow"))
    await settle()
    await asyncio.sleep(0.3)
    for _ in range(10):
        w.responses.put_nowait(_token("slow"))
        w.responses.put_nowait(_token("fast"))
        await settle()
        assert isinstance(await fast.read(), task_pb2.TaskOutput)  # read as it arrives: never cancelled
    cancels = [r.cancel.request_id for r in w.sent if r.WhichOneof("kind") == "cancel"]
    assert cancels == ["slow"]


async def test_an_adapter_and_its_base_share_their_engine_s_slots():
    # A LoRA adapter's version runs on its base's engine: the worker lists both with the engine's max_num_seqs,
    # but they are one set of slots, not two.
    adapter = "m-v1-lora"
    h = Harness(engine_of=lambda version: (MODEL, version) if version == adapter else (version, ""))
    h.dispatcher.start()
    try:
        h.dispatcher.sync_members({"a": worker_pb2.WorkerInfo(worker_id="a", address="127.0.0.1:1000", models=[
            worker_pb2.WorkerModel(model_version=MODEL, max_num_seqs=2),
            worker_pb2.WorkerModel(model_version=adapter, max_num_seqs=2)])})
        w = h.dispatcher.workers["a"]
        h.submit("base0"), h.submit("base1")
        task = task_pb2.Task(request_id="lora0", model_version=adapter, priority=2,
                             generate=task_pb2.GenerateInput(prompt="hi"))
        h.dispatcher.submit(Entry(task, priority=2))
        await settle()
        assert w.task_ids == ["base0", "base1"] and w.room(adapter) == 0  # the engine is full
        w.finish("base0")
        await settle()
        assert w.task_ids[-1] == "lora0" and w.room(MODEL) == 0
    finally:
        await h.dispatcher.stop()
