"""The dispatcher: per-model priority queues, worker membership, routing, dispatch to workers with room, and
migration of streams whose worker was lost.

Dispatch is event-driven: a submit, a finished task, a load report or a membership change wakes it, and it pops
tasks while some worker serving their model has room, or has room that a lower priority class holds (the worker's
engine preempts that sequence). Among those, routing picks one: KV-aware (the score in SchedulerConfig.routing's
comment: cached prompt prefix from the workers' KV events against load, KV pressure and queued prefill work), least
loaded, or round-robin. A task whose worker is lost mid-stream is queued again at the head of its class with the
tokens already sent per choice (GenerateInput.resume, resume_choices), up to max_migrations times. Connections
to workers come from a factory (WorkerConnection by default), so the rules here are unit-tested without channels.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import typing

import grpc

from llmserve.common import kvhash, priority
from llmserve.common.errors import ServiceError, resource_exhausted, unavailable
from llmserve.common.logs import get_logger
from llmserve.dispatch.v1 import scheduler_pb2, worker_pb2
from llmserve.scheduler import metrics
from llmserve.scheduler.kvindex import KvIndex
from llmserve.scheduler.queue import Entry, ModelQueue
from llmserve.scheduler.workers import WorkerConnection

log = get_logger(__name__)

# (worker info, on_change) -> a live connection; on_change is called when its room or liveness changes.
ConnectionFactory = typing.Callable[[worker_pb2.WorkerInfo, typing.Callable[[], None]], WorkerConnection]

RECONNECT_DELAY_S = 1.0
# A task with a deadline is refused at once when the tasks ahead of it, at the rate tasks of its model finished over
# the last RATE_WINDOW_S (at least RATE_MIN_SAMPLES of them), would take longer than the time it has left.
RATE_WINDOW_S = 30.0
RATE_MIN_SAMPLES = 8

# version -> (the version whose engine computes it, the LoRA adapter's name or ""): an adapter's blocks are its
# base engine's, salted with the adapter's name.
EngineOf = typing.Callable[[str], tuple[str, str]]
ROUTINGS = ("kv", "least_loaded", "round_robin")


class Dispatcher:
    def __init__(self, max_queue_per_model: int, aging_s: float, *,
                 connect: ConnectionFactory = WorkerConnection, reconnect_delay_s: float = RECONNECT_DELAY_S,
                 worker_wait_s: float = 0.0, routing: str = "least_loaded", kv_hit_weight: float = 1.0,
                 kv_load_weight: float = 1.5, kv_pressure_weight: float = 0.5, kv_prefill_weight: float = 1.0,
                 max_migrations: int = 0,
                 worker_silence_s: float | None = None, engine_of: EngineOf | None = None,
                 preemption: bool = True, max_queue_per_class: typing.Sequence[int] = (),
                 rate_window_s: float = RATE_WINDOW_S):
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r} is not one of {', '.join(ROUTINGS)}")
        self.routing = routing
        self.kv_hit_weight, self.kv_load_weight, self.kv_pressure_weight = (kv_hit_weight, kv_load_weight,
                                                                            kv_pressure_weight)
        self.kv_prefill_weight = kv_prefill_weight
        self.max_migrations = max_migrations
        self.worker_silence_s = worker_silence_s
        self.engine_of: EngineOf = engine_of or (lambda version: (version, ""))
        self.index = KvIndex()
        self._turns: dict[str, itertools.count] = {}  # round-robin position per model version
        self.max_queue_per_model = max_queue_per_model
        self.max_queue_per_class = list(max_queue_per_class)  # per class 1..3; missing or 0: only the model's cap
        self.aging_s = aging_s
        self.preemption = preemption
        self.rate_window_s = rate_window_s
        # A model whose last worker went away less than this long ago still takes tasks: they wait for a worker
        # to come back (a restarted one is back in seconds) instead of failing at once.
        self.worker_wait_s = worker_wait_s
        self._lost: dict[str, float] = {}  # model version -> when its last worker went away (monotonic)
        self._wait_timer: asyncio.TimerHandle | None = None
        self._is_stopping = False
        self.connect = connect
        self.reconnect_delay_s = reconnect_delay_s
        self.queues: dict[str, ModelQueue] = {}
        self.workers: dict[str, WorkerConnection] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reconnects: dict[str, asyncio.TimerHandle] = {}
        self.members: dict[str, worker_pb2.WorkerInfo] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._wait_timer is not None:
            self._wait_timer.cancel()
        self._is_stopping = True  # the connections closed below must not schedule redials
        for handle in self._reconnects.values():
            handle.cancel()
        await asyncio.gather(*(w.close() for w in self.workers.values()), return_exceptions=True)
        for queue in self.queues.values():
            for entry in queue.drain():
                entry.outbox.put_nowait(unavailable("the scheduler is shutting down; retry"))

    def wake(self) -> None:
        self._wake.set()

    # ---- membership (from the etcd watch) ----

    def sync_members(self, members: dict[str, worker_pb2.WorkerInfo]) -> None:
        self.members = dict(members)
        for worker_id, conn in list(self.workers.items()):
            info = members.get(worker_id)
            if info is None or info.address != conn.info.address:
                self.workers.pop(worker_id)
                self._note_lost(conn)
                self.index.drop_worker(worker_id)
                asyncio.create_task(conn.close())
                log.info("worker left", worker_id=worker_id)
        for worker_id, info in members.items():
            known = self.workers.get(worker_id)
            if known is not None and known.info.models != info.models:
                known.update_models(info)  # models added or dropped at run time (LoRA adapters)
                log.info("worker models changed", worker_id=worker_id, models=[m.model_version for m in info.models])
            if worker_id not in self.workers:
                self.workers[worker_id] = self._connect(info)
                log.info("worker joined", worker_id=worker_id, address=info.address,
                         models=[m.model_version for m in info.models])
        metrics.WORKERS.set(len(self.workers))
        self.wake()

    def _on_worker_change(self) -> None:
        # A dead stream of a worker that is still registered: reconnect after a pause.
        for worker_id, conn in self.workers.items():
            if self._is_stopping:
                break
            if not conn.is_alive and worker_id not in self._reconnects:
                self._note_lost(conn)
                self._reconnects[worker_id] = asyncio.get_running_loop().call_later(
                    self.reconnect_delay_s, self._reconnect, worker_id)
        self.wake()

    def _reconnect(self, worker_id: str) -> None:
        self._reconnects.pop(worker_id, None)
        conn = self.workers.get(worker_id)
        if conn is not None and not conn.is_alive and worker_id in self.members:
            self.workers[worker_id] = self._connect(self.members[worker_id])
            asyncio.create_task(conn.close())

    def _connect(self, info: worker_pb2.WorkerInfo) -> WorkerConnection:
        conn = self.connect(info, self._on_worker_change)
        conn.on_kv_events = self.index.apply  # the new stream starts with a snapshot, which resets the worker's
        conn.on_finished = self._on_finished
        conn.engine_of = lambda version: self.engine_of(version)[0]
        return conn

    def _on_finished(self, entry: Entry) -> None:
        queue = self.queues.get(entry.task.model_version)
        if queue is not None:
            queue.note_finished(time.monotonic(), self.rate_window_s)

    def _note_lost(self, conn: WorkerConnection) -> None:
        """Notes when the models of a connection that went away lost their last live worker (a connection that
        never answered, a redial of a worker still down, changes nothing: the wait runs from the real loss)."""
        if not conn.is_ready:
            return
        for version in conn.capacity:
            if not any(w is not conn for w in self.serving(version)):
                self._lost[version] = time.monotonic()

    def _awaits_worker(self, version: str) -> bool:
        """Whether tasks of a model without a live worker wait for one (its last went away recently)."""
        lost = self._lost.get(version)
        return lost is not None and time.monotonic() - lost < self.worker_wait_s

    def _wake_when_the_wait_ends(self, version: str) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
        delay = self._lost[version] + self.worker_wait_s - time.monotonic()
        self._wait_timer = asyncio.get_running_loop().call_later(max(0.0, delay) + 0.01, self.wake)

    def serving(self, version: str) -> list[WorkerConnection]:
        return [w for w in self.workers.values() if w.is_alive and w.serves(version)]

    # ---- queueing ----

    def submit(self, entry: Entry) -> None:
        version = entry.task.model_version
        if not self.serving(version) and not self._awaits_worker(version):
            raise unavailable(f"no worker serves model version {version!r} right now; start a worker with it "
                              "(worker.models) or retry later")
        queue = self.queues.setdefault(version, ModelQueue(self.aging_s))
        if len(queue) >= self.max_queue_per_model:
            raise resource_exhausted(f"the queue of model version {version!r} is full "
                                     f"({self.max_queue_per_model} tasks); retry later")
        cls = entry.priority
        cap = self.max_queue_per_class[cls - 1] if cls <= len(self.max_queue_per_class) else 0
        if cap and len(queue.fifos[cls - 1]) >= cap:
            raise resource_exhausted(f"the {priority.name(cls)} queue of model version {version!r} is full "
                                     f"({cap} tasks); retry later or send it in another priority class")
        self._refuse_if_late(queue, entry)
        queue.push(entry)
        metrics.QUEUED.labels(version).set(len(queue))
        self.wake()

    def _refuse_if_late(self, queue: ModelQueue, entry: Entry) -> None:
        """RESOURCE_EXHAUSTED at once for a task whose deadline its queue cannot meet (by RATE_WINDOW_S's rate),
        instead of letting it wait until the deadline passes: the caller can go elsewhere while there is time."""
        deadline_ms = entry.task.deadline_unix_ms
        if not deadline_ms:
            return
        workers = self.serving(entry.task.model_version)
        if any(w.fits(entry, preempting=self.preemption) for w in workers):
            return  # it starts now
        now = time.monotonic()
        rate = queue.finish_rate(now, self.rate_window_s, RATE_MIN_SAMPLES)
        if rate is None:
            return
        ahead = queue.ahead_of(entry) + 1  # it needs a slot too: the next one to free
        wait_s = ahead / rate
        left_s = deadline_ms / 1000 - time.time()
        if wait_s > left_s:
            metrics.REFUSED_LATE.labels(priority.name(entry.priority)).inc()
            raise resource_exhausted(
                f"the deadline cannot be met: about {ahead} task(s) are ahead of this one in the queue of model "
                f"version {entry.task.model_version!r}, about {wait_s:.1f} s at the rate tasks finish "
                f"({rate:.1f}/s), and the deadline leaves {max(left_s, 0.0):.1f} s; allow more time, use a higher "
                "priority class, or retry later")

    def cancel(self, entry: Entry) -> None:
        if entry.is_done:
            return
        entry.is_done = True
        if entry.worker is not None:
            entry.worker.cancel(entry)
        else:
            queue = self.queues.get(entry.task.model_version)
            if queue is not None and queue.remove(entry):
                metrics.QUEUED.labels(entry.task.model_version).set(len(queue))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._dispatch_all()

    def _dispatch_all(self) -> None:
        now_ms = time.time() * 1000
        for version, queue in self.queues.items():
            workers = self.serving(version)
            if not workers and self._awaits_worker(version):
                self._wake_when_the_wait_ends(version)
                continue
            if not workers:
                for orphan in queue.drain():
                    orphan.outbox.put_nowait(unavailable(
                        f"no worker serves model version {version!r} any more; retry later"))
            while len(queue):
                head = queue.peek()
                if head is None:
                    break
                # The head waits for a worker its n sequences fit on (those behind it wait too: none starves).
                candidates = [w for w in workers if w.fits(head) and not w.is_silent(self.worker_silence_s)]
                if candidates:
                    entry = queue.pop()
                else:
                    # No free slot: the best class's next task may still take one a lower class holds (the
                    # worker's engine preempts that sequence). Free slots keep going by aging, so a starved
                    # batch task still gets the next one that frees.
                    taken = self._preempting_pick(queue, workers)
                    if taken is None:
                        break
                    entry, candidates = taken
                    metrics.PREEMPTING_DISPATCHES.labels(version, priority.name(entry.priority)).inc()
                if entry is None:
                    break
                deadline = entry.task.deadline_unix_ms
                if deadline and deadline < now_ms:
                    entry.is_done = True
                    entry.outbox.put_nowait(ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                         "the deadline passed while the request was queued"))
                    continue
                self._promote_if_aged(queue, entry)
                worker = self.pick(entry, candidates)
                wait_s = time.monotonic() - entry.enqueued
                entry.on_lost = self._on_lost
                worker.dispatch(entry)
                metrics.QUEUE_TIME.labels(version).observe(wait_s)
                entry.outbox.put_nowait(scheduler_pb2.TaskDispatched(worker_id=worker.worker_id,
                                                                     queue_time_ms=wait_s * 1000))
            metrics.QUEUED.labels(version).set(len(queue))

    def _promote_if_aged(self, queue: ModelQueue, entry: Entry) -> None:
        """A task that climbed classes while it waited runs in the class it reached (the worker's engine is told
        too): after 2 * aging_s a batch task is not preempted by interactive traffic any more, so aging bounds
        how long it waits to start and to finish, not only its place in the queue."""
        reached = max(1, int(queue.effective(entry, time.monotonic())))
        if reached < entry.priority:
            entry.priority = reached
            entry.task.priority = priority.to_pb(reached)

    def _preempting_pick(self, queue: ModelQueue, workers: list[WorkerConnection]
                         ) -> tuple[Entry, list[WorkerConnection]] | None:
        """(the task taken from the queue, the workers it fits on by preempting lower classes), or None."""
        if not self.preemption:
            return None
        for cls in range(1, priority.NUM_CLASSES):  # the lowest class preempts nobody
            entry = queue.head_of_class(cls)
            if entry is None:
                continue
            candidates = [w for w in workers if w.fits(entry, preempting=True)
                          and not w.is_silent(self.worker_silence_s)]
            if candidates:
                return queue.pop_class(cls), candidates
            return None  # the best class waiting cannot preempt: neither can a lower one
        return None

    # ---- routing ----

    def pick(self, entry: Entry, candidates: list[WorkerConnection]) -> WorkerConnection:
        """The worker the task goes to, among candidates with room for it (scheduler.routing)."""
        version = entry.task.model_version
        if self.routing == "round_robin" or (len(candidates) == 1 and self.routing != "kv"):
            ordered = sorted(candidates, key=lambda w: w.worker_id)
            return ordered[next(self._turns.setdefault(version, itertools.count())) % len(ordered)]
        if self.routing == "least_loaded":
            return min(candidates, key=lambda w: w.utilization(version))
        hits = self.cached_prompt_share(entry, candidates)
        prompt = self.prompt_tokens(entry)
        uncached = {w.worker_id: prompt * (1.0 - hits.get(w.worker_id, 0.0)) for w in candidates}
        best = max(candidates, key=lambda w: (self.score(w, version, hits.get(w.worker_id, 0.0),
                                                         uncached[w.worker_id]), -w.utilization(version)))
        entry.prefill_tokens = round(uncached[best.worker_id])  # the worker's backlog until its first output
        size = self.index.block_size(best.worker_id, self.engine_of(version)[0])
        if entry.kv_keys.get(size):  # it will hold them: followers of this prefix find it before its events do
            self.index.predict(best.worker_id, self.engine_of(version)[0], entry.kv_keys[size])
        return best

    def score(self, worker: WorkerConnection, version: str, hit: float, prefill_tokens: float = 0.0) -> float:
        """KV-aware routing's score: kv_hit_weight * hit - kv_load_weight * load - kv_pressure_weight * pressure
        - kv_prefill_weight * (prompt tokens the worker must compute before this task's first token, its backlog
        of tasks not yet answered and this task's uncached part, in thousands)."""
        backlog = (worker.prefill_backlog() + prefill_tokens) / 1000
        return (self.kv_hit_weight * hit - self.kv_load_weight * worker.utilization(version)
                - self.kv_pressure_weight * worker.kv_pressure(version) - self.kv_prefill_weight * backlog)

    @staticmethod
    def prompt_tokens(entry: Entry) -> int:
        """Tokens the task's prompt computes (with a resumed stream's), 0 when the gateway sent no token ids."""
        task = entry.task
        if task.WhichOneof("input") != "generate":
            return 0
        return len(task.generate.prompt_token_ids) + len(task.generate.resume.token_ids)

    def cached_prompt_share(self, entry: Entry, candidates: list[WorkerConnection]) -> dict[str, float]:
        """worker id -> share of the task's cacheable prompt blocks (the full blocks before its last token) that
        its prefix cache holds from the start (by the KV index); empty when the task carries no token ids."""
        task = entry.task
        if task.WhichOneof("input") != "generate" or not task.generate.prompt_token_ids:
            return {}
        tokens = [*task.generate.prompt_token_ids, *task.generate.resume.token_ids]
        engine_version, adapter = self.engine_of(task.model_version)
        salt = kvhash.engine_salt(task.cache_salt, adapter)
        shares: dict[str, float] = {}
        by_size: dict[int, list[str]] = {}
        for w in candidates:
            size = self.index.block_size(w.worker_id, engine_version)
            if size:
                by_size.setdefault(size, []).append(w.worker_id)
        for size, worker_ids in by_size.items():
            keys = entry.kv_keys.get(size)
            if keys is None:
                keys = entry.kv_keys[size] = kvhash.prompt_block_keys(tokens, salt, size)
            for worker_id, blocks in self.index.cached_prefix_blocks(engine_version, keys, worker_ids).items():
                shares[worker_id] = blocks / len(keys) if keys else 0.0
        return shares

    # ---- migration ----

    def _on_lost(self, entry: Entry, reason: str) -> None:
        """The worker running the task went away: queue it again, resuming where the submitter is, or fail it
        with UNAVAILABLE saying why it cannot move."""
        why = self._why_not_migratable(entry)
        if why:
            metrics.MIGRATIONS.labels("refused").inc()
            log.warning("worker lost; request not migrated", request_id=entry.request_id, reason=reason, why=why)
            entry.outbox.put_nowait(unavailable(f"the worker running the request went away and the request cannot "
                                                f"be migrated: {why}"))
            return
        original = entry.original or entry.task
        entry.original = original
        task = entry.sent.resumed(original)
        entry.task, entry.worker, entry.is_done = task, None, False
        entry.migrations += 1
        entry.kv_keys.clear()
        queue = self.queues.setdefault(task.model_version, ModelQueue(self.aging_s))
        queue.push_front(entry)
        metrics.MIGRATIONS.labels("migrated").inc()
        log.info("worker lost; request migrated", request_id=entry.request_id, reason=reason,
                 resumed_tokens=len(entry.sent.token_ids), migrations=entry.migrations)
        self.wake()

    def _why_not_migratable(self, entry: Entry) -> str:
        if not self.max_migrations:
            return "migration is off (scheduler.max_migrations=0); retry it"
        if entry.migrations >= self.max_migrations:
            return (f"it was moved {entry.migrations} time(s) already (scheduler.max_migrations="
                    f"{self.max_migrations}); retry it")
        return entry.sent.why_not_resumable(entry.task)
