"""Connections to workers: one bidirectional Serve stream per worker, multiplexed by request_id."""

from __future__ import annotations

import asyncio
import collections
import time
import typing

import grpc

from llmserve.common import tls
from llmserve.common.config import SecurityConfig
from llmserve.common.errors import ServiceError
from llmserve.common.logs import get_logger
from llmserve.common.meshauth import mesh_metadata
from llmserve.common.priority import NUM_CLASSES
from llmserve.common.server import CHANNEL_OPTIONS
from llmserve.dispatch.v1 import task_pb2, worker_pb2, worker_pb2_grpc
from llmserve.scheduler.queue import Entry

log = get_logger(__name__)

# Silence after which a message counts as a return (wakes the dispatcher: a worker it skipped may take tasks again).
SILENT_AFTER_S = 1.5


class WorkerConnection:
    """The scheduler's side of one worker. Counts its own in-flight tasks per model to decide room at once;
    the worker's last load report breaks ties between workers with room (utilization)."""

    def __init__(self, info: worker_pb2.WorkerInfo, on_change: typing.Callable[[], None], mesh_token: str = "",
                 security: SecurityConfig | None = None):
        self.info = info
        self._metadata = mesh_metadata(mesh_token)  # workers refuse callers outside the mesh
        self.worker_id = info.worker_id
        self.capacity = {m.model_version: m.max_num_seqs for m in info.models}
        # Sequences in flight per engine (a LoRA adapter's version shares its base's engine, and so its slots:
        # engine_of, set by the dispatcher, maps a version to the version whose engine runs it), and the same by
        # priority class (index class - 1): what a higher class may take from lower ones.
        self.engine_of: typing.Callable[[str], str] = lambda version: version
        self.num_inflight: collections.Counter[str] = collections.Counter()
        self.num_inflight_by_class: dict[str, list[int]] = collections.defaultdict(lambda: [0] * NUM_CLASSES)
        self.load: dict[str, task_pb2.ModelLoad] = {}
        self.entries: dict[str, Entry] = {}
        self.is_alive = True
        # The worker answered on the stream (it sends a load report as soon as the stream opens). Tasks go only to
        # a ready connection: one still dialling a restarting worker would lose them at once.
        self.is_ready = False
        self.last_heard = time.monotonic()  # when the worker last sent anything (outputs, load, KV events)
        self.on_kv_events: typing.Callable[[str, worker_pb2.KvEvents], None] | None = None  # the dispatcher's index
        self.on_finished: typing.Callable[[Entry], None] | None = None  # the dispatcher's finish-rate estimate
        self._on_change = on_change
        self._outbox: asyncio.Queue[worker_pb2.ServeRequest | None] = asyncio.Queue()
        security = security or SecurityConfig()
        self._channel = tls.aio_channel(info.address, security, "scheduler", CHANNEL_OPTIONS,
                                        server_name=security.tls_worker_server_name)
        self._task = asyncio.create_task(self._run(), name=f"worker {self.worker_id}")

    def update_models(self, info: worker_pb2.WorkerInfo) -> None:
        """The worker's model list changed (same address): new models get room, dropped ones get none; tasks in
        flight keep their counts until they finish."""
        self.info = info
        self.capacity = {m.model_version: m.max_num_seqs for m in info.models}

    def serves(self, version: str) -> bool:
        return version in self.capacity

    def is_silent(self, silence_s: float | None) -> bool:
        """No message for silence_s (a hung worker: its load reports stopped)."""
        return silence_s is not None and time.monotonic() - self.last_heard > silence_s

    def kv_pressure(self, version: str) -> float:
        """Share of the engine's KV blocks in use at the last report (0 when unknown)."""
        reported = self.load.get(version)
        if reported is None or not reported.num_kv_blocks:
            return 0.0
        return 1.0 - reported.num_free_kv_blocks / reported.num_kv_blocks

    def prefill_backlog(self) -> int:
        """Prompt tokens this worker has still to compute for the tasks sent to it that have not answered yet
        (routing's estimates at dispatch): a worker with cold prefills queued is slower to a first token than its
        sequence count says."""
        return sum(e.prefill_tokens for e in self.entries.values() if not e.sent.num_outputs)

    def room(self, version: str) -> int:
        """Sequences of the model the worker can take now."""
        if not (self.is_alive and self.is_ready):
            return 0
        return self.capacity.get(version, 0) - self.num_inflight[self.engine_of(version)]

    def room_by_preemption(self, version: str, priority: int) -> int:
        """Sequences of a class-`priority` task the worker can start now if it preempts lower classes: its slots
        less those held by the same or higher classes. The engine does the preempting (a waiting sequence takes
        the slot of a running lower-class one, which recomputes later with the same output)."""
        if not (self.is_alive and self.is_ready):
            return 0
        held = self.num_inflight_by_class.get(self.engine_of(version), [0] * NUM_CLASSES)[:priority]
        return self.capacity.get(version, 0) - sum(held)

    def fits(self, entry: Entry, preempting: bool = False) -> bool:
        """Whether the task's sequences fit now (one wider than the whole model waits for an idle worker);
        preempting: counting the slots lower classes hold as room."""
        version = entry.task.model_version
        room = self.room_by_preemption(version, entry.priority) if preempting else self.room(version)
        return room >= min(entry.weight, self.capacity.get(version, 0)) > 0

    def utilization(self, version: str) -> float:
        """Busy share of the model's slots: our own count, or the worker's last report when that says more
        (sequences sent by another scheduler, or still held by the worker after we counted them finished)."""
        busy = self.num_inflight[self.engine_of(version)]
        reported = self.load.get(version)
        if reported is not None:
            busy = max(busy, reported.num_running + reported.num_waiting)
        return busy / max(1, self.capacity.get(version, 1))

    def dispatch(self, entry: Entry) -> None:
        entry.worker = self
        self.entries[entry.request_id] = entry
        entry.engine = self.engine_of(entry.task.model_version)
        self.num_inflight[entry.engine] += entry.weight
        self.num_inflight_by_class[entry.engine][entry.priority - 1] += entry.weight
        self._outbox.put_nowait(worker_pb2.ServeRequest(task=entry.task))

    def cancel(self, entry: Entry) -> None:
        if self.entries.get(entry.request_id) is entry:
            self._outbox.put_nowait(worker_pb2.ServeRequest(cancel=task_pb2.CancelTask(request_id=entry.request_id)))
            self._finish(entry)

    def _drop_slow_consumer(self, entry: Entry) -> None:
        """The submitter stopped reading: cancel the request on the worker instead of buffering for nobody."""
        log.warning("caller stopped reading the stream; request cancelled", request_id=entry.request_id,
                    backlog=entry.outbox.qsize())
        entry.outbox.put_nowait(ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the stream was not read for {entry.slow_consumer_timeout_s:g} s or fell {entry.max_backlog} outputs "
            "behind; the request was cancelled (read streams as they arrive)"))
        self.cancel(entry)

    def _finish(self, entry: Entry) -> None:
        if self.entries.pop(entry.request_id, None) is not None:
            self.num_inflight[entry.engine] -= entry.weight
            self.num_inflight_by_class[entry.engine][entry.priority - 1] -= entry.weight
            entry.is_done = True
            if self.on_finished is not None:
                self.on_finished(entry)
            self._on_change()

    async def _requests(self) -> typing.AsyncIterator[worker_pb2.ServeRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message

    def _serve(self) -> typing.AsyncIterator[worker_pb2.ServeResponse]:
        """The worker's side of the Serve stream (the one place that touches the network)."""
        return worker_pb2_grpc.WorkerServiceStub(self._channel).Serve(self._requests(), metadata=self._metadata)

    async def _run(self) -> None:
        reason = "stream ended"
        try:
            async for message in self._serve():
                was_silent = time.monotonic() - self.last_heard > SILENT_AFTER_S
                self.last_heard = time.monotonic()
                if not self.is_ready or was_silent:  # a hung worker that speaks again rejoins routing
                    self.is_ready = True
                    self._on_change()
                kind = message.WhichOneof("kind")
                if kind == "output":
                    output = message.output
                    entry = self.entries.get(output.request_id)
                    if entry is None:
                        continue  # cancelled here already
                    if not entry.deliver(output):
                        self._drop_slow_consumer(entry)
                        continue
                    entry.sent.note(output)
                    if output.finished:
                        self._finish(entry)
                elif kind == "kv_events":
                    if self.on_kv_events is not None:
                        self.on_kv_events(self.worker_id, message.kv_events)
                else:
                    self.load = {m.model_version: m for m in message.load.models}
        except asyncio.CancelledError:
            reason = "worker left the registry"
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        finally:
            self.is_alive = False
            lost = list(self.entries.values())
            for entry in lost:
                self._finish(entry)
                if entry.on_lost is not None:  # the dispatcher migrates it, or fails it saying why
                    entry.on_lost(entry, reason)
                else:
                    entry.outbox.put_nowait(ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        "the worker running the request went away; retry it"))  # which one, and why: the log
            if lost:
                log.warning("worker lost with tasks in flight", worker_id=self.worker_id, num_tasks=len(lost),
                            reason=reason)
            self._on_change()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self._channel.close(grace=None)
