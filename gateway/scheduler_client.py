"""The scheduler hop: one Submit stream per task, all of a request's tasks concurrently, outputs merged as they come.
A scheduler replica that fails a task (dies mid-stream, cannot be reached) hands it to another (gateway/schedulers.py
picks which), resumed from the tokens the caller already has.

What fails behind the gateway reaches the caller as its status code with a message the gateway chooses
(public_error): the scheduler's and workers' own text can name workers, internal addresses or internals, so only
the codes whose messages the mesh writes for the caller (what to change in the request) pass theirs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing

import grpc

from llmserve.common import resume, tracing
from llmserve.common.errors import SCHEDULER_ANSWERED, ServiceError, code_from_int
from llmserve.common.logs import get_logger
from llmserve.common.meshauth import mesh_metadata
from llmserve.dispatch.v1 import scheduler_pb2, task_pb2
from llmserve.gateway import metrics
from llmserve.gateway.schedulers import Scheduler, SchedulerPool

log = get_logger(__name__)

OnDispatched = typing.Callable[[scheduler_pb2.TaskDispatched], None]

# Codes whose messages are written for the caller (they name fields, limits, the model version): passed on.
CALLER_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                          grpc.StatusCode.OUT_OF_RANGE})
MAX_DETAIL_CHARS = 500  # of a failure's own text in the gateway's log
MIGRATION_REFUSED = "cannot be migrated: "  # what the scheduler says, then why (scheduler/dispatcher.py)


def public_error(code: grpc.StatusCode, detail: str, task: task_pb2.Task, *, dispatched: bool) -> ServiceError:
    """The status a caller sees for a task that failed behind the gateway; the detail goes to the log only.
    dispatched: the task had reached a worker."""
    log.warning("task failed", code=code.name, detail=detail[:MAX_DETAIL_CHARS], dispatched=dispatched)
    version = task.model_version
    if code in CALLER_CODES:
        return ServiceError(code, detail[:MAX_DETAIL_CHARS])
    if code == grpc.StatusCode.UNAVAILABLE:
        if dispatched:
            # The scheduler's reason for not migrating the stream to another worker is written for the caller.
            _, found, why = detail.partition(MIGRATION_REFUSED)
            return ServiceError(code, f"the worker running this request on model version {version!r} went away "
                                      "before it finished" + (f" and the request {MIGRATION_REFUSED}"
                                                              f"{why[:MAX_DETAIL_CHARS]}" if found else "; retry it"))
        return ServiceError(code, f"no worker serves model version {version!r} right now (or the scheduler is "
                                  "unreachable); retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceError(code, f"the deadline passed before model version {version!r} finished the request; "
                                  "allow more time or ask for fewer tokens")
    if code == grpc.StatusCode.CANCELLED:
        return ServiceError(code, "the request was cancelled")
    # Anything else is the mesh's fault (an internal call refused, a crash): INTERNAL, with the id to report.
    request_id = task.request_id.rpartition("-")[0] or task.request_id
    return ServiceError(grpc.StatusCode.INTERNAL, f"model version {version!r} failed to run the request; retry, "
                                                  f"or report request id {request_id}")


class SchedulerLost(Exception):
    """A task's scheduler failed it with UNAVAILABLE (it died, cannot be reached, is shutting down, or has no worker
    for it right now) other than by refusing to migrate it: another scheduler may run it."""

    def __init__(self, code: grpc.StatusCode, detail: str, *, answered: bool):
        super().__init__(detail)
        self.code, self.detail, self.answered = code, detail, answered  # answered: the scheduler itself said so


@dataclasses.dataclass
class Sent(resume.Sent):
    """What of a task reached the gateway (so the caller): what a failover resumes from, as the scheduler's Entry
    keeps it for a migration."""
    is_dispatched: bool = False


def resume_task(task: task_pb2.Task, sent: Sent, failovers: int) -> task_pb2.Task:
    """The task for its next scheduler: as submitted, resuming from what was sent (GenerateInput.resume, as the
    dispatcher builds it for a migration; the worker continues prompt + those tokens, seeded draws skipped). It runs
    under a request id of its own: the worker may not have dropped the task of the lost scheduler yet (its stream
    broke at the same moment), and an engine refuses an id it is still running."""
    attempt = sent.resumed(task)
    attempt.request_id = f"{task.request_id}.{failovers}"  # public_error still finds the request id before "-"
    return attempt


class SchedulerClient:
    def __init__(self, pool: SchedulerPool, mesh_token: str = "", max_failovers: int = 0):
        self.pool = pool
        self.mesh_metadata = mesh_metadata(mesh_token)  # the scheduler refuses callers outside the mesh
        self.max_failovers = max_failovers

    async def run_task(self, task: task_pb2.Task, context, on_dispatched: OnDispatched
                       ) -> typing.AsyncIterator[task_pb2.TaskOutput]:
        """The task's outputs until the finished one; a task error is raised as its status. A scheduler that fails
        it (SchedulerLost) hands it to another, up to max_failovers times: started over when nothing reached the
        gateway yet, else resumed from what did (resume_task), so the caller's stream goes on uninterrupted."""
        remaining = context.time_remaining()
        if remaining is not None:
            task.deadline_unix_ms = int((time.time() + remaining) * 1000)
        sent, failed_on, failovers, attempt = Sent(), set[str](), 0, task
        while True:
            scheduler = await self.pool.pick(failed_on, context.time_remaining())
            try:
                with self.pool.running(scheduler):
                    async with contextlib.aclosing(self._submit(scheduler, attempt, task, context, on_dispatched,
                                                                sent)) as outputs:
                        async for output in outputs:
                            yield output
                return
            except SchedulerLost as lost:
                failed_on.add(scheduler.address)
                if not lost.answered:
                    self.pool.note_failed(scheduler)
                why = self._why_not_resumable(task, sent, failovers)
                if why is not None:
                    if not why:  # nothing to add to the scheduler's own reason
                        raise public_error(lost.code, lost.detail, task, dispatched=sent.is_dispatched) from None
                    log.warning("scheduler lost; task not moved", request_id=task.request_id, why=why)
                    metrics.SCHEDULER_FAILOVERS.labels("refused").inc()
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                       f"the scheduler running this request on model version {task.model_version!r} "
                                       f"went away and the request {MIGRATION_REFUSED}{why}") from None
                failovers += 1
                attempt = resume_task(task, sent, failovers)
                metrics.SCHEDULER_FAILOVERS.labels("resumed" if sent.num_outputs else "restarted").inc()
                log.info("scheduler lost; task moved", request_id=task.request_id, answered=lost.answered,
                         resumed_tokens=len(sent.token_ids), failovers=failovers)

    def _why_not_resumable(self, task: task_pb2.Task, sent: Sent, failovers: int) -> str | None:
        """None: move the task to another scheduler; "": fail it with the scheduler's own status; else why it
        cannot move (the caller is told), as the scheduler's dispatcher says for a lost worker."""
        if failovers >= self.max_failovers:
            if not sent.num_outputs or not self.max_failovers:
                return ""
            return (f"it was moved {failovers} time(s) already (gateway.max_scheduler_failovers="
                    f"{self.max_failovers}); retry it")
        return sent.why_not_resumable(task) or None  # nothing sent: any scheduler can start it over

    async def _submit(self, scheduler: Scheduler, attempt: task_pb2.Task, task: task_pb2.Task, context,
                      on_dispatched: OnDispatched, sent: Sent) -> typing.AsyncGenerator[task_pb2.TaskOutput, None]:
        """One Submit stream of the task on one scheduler (attempt: the task as sent, task: as the caller made it)."""
        remaining = context.time_remaining()
        call = scheduler.stub.Submit(timeout=remaining, metadata=(*tracing.inject().items(), *self.mesh_metadata))
        try:
            await call.write(scheduler_pb2.SubmitRequest(task=attempt))
            async for response in call:
                if response.HasField("dispatched"):
                    sent.is_dispatched = True
                    on_dispatched(response.dispatched)
                elif response.HasField("output"):
                    output = response.output
                    if output.HasField("error"):
                        raise public_error(code_from_int(output.error.code), output.error.message, task,
                                           dispatched=sent.is_dispatched)
                    sent.note(output)
                    yield output
                    if output.finished:
                        return
            raise SchedulerLost(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the task without a result",
                                answered=True)
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE and MIGRATION_REFUSED not in detail:
                trailers = tuple(exc.trailing_metadata() or ())
                raise SchedulerLost(exc.code(), detail, answered=SCHEDULER_ANSWERED in trailers) from None
            raise public_error(exc.code(), detail, task, dispatched=sent.is_dispatched) from None
        finally:
            call.cancel()  # no-op when finished; otherwise the scheduler frees the worker's slot

    async def run_all(self, tasks: list[task_pb2.Task], context, on_dispatched: OnDispatched
                      ) -> typing.AsyncIterator[tuple[int, task_pb2.TaskOutput]]:
        """Runs the tasks concurrently; yields (task index, output) as they arrive. The first failure ends all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, task: task_pb2.Task) -> None:
            try:
                async for output in self.run_task(task, context, on_dispatched):
                    queue.put_nowait((index, output))
            except BaseException as exc:
                queue.put_nowait((index, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise

        pumps = [asyncio.create_task(pump(i, t)) for i, t in enumerate(tasks)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if item.finished:
                    remaining -= 1
        finally:
            for p in pumps:
                p.cancel()
