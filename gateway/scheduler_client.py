"""The scheduler hop: one Submit stream per task, all of a request's tasks concurrently, outputs merged as they come.

What fails behind the gateway reaches the caller as its status code with a message the gateway chooses
(public_error): the scheduler's and workers' own text can name workers, internal addresses or internals, so only
the codes whose messages the mesh writes for the caller (what to change in the request) pass theirs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing

import grpc

from llmserve.common import tracing
from llmserve.common.errors import ServiceError, code_from_int
from llmserve.common.logs import get_logger
from llmserve.common.meshauth import mesh_metadata
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2

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


class SchedulerClient:
    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerServiceStub, mesh_token: str = "",
                 channel: grpc.aio.Channel | None = None, wait_s: float = 0.0):
        self.scheduler = scheduler
        self.mesh_metadata = mesh_metadata(mesh_token)  # the scheduler refuses callers outside the mesh
        self.channel, self.wait_s = channel, wait_s  # see _wait_for_scheduler

    async def _wait_for_scheduler(self, remaining: float | None) -> None:
        """A scheduler that restarts is back in seconds: rather than failing every request meanwhile (bench/chaos.py
        saw 75 UNAVAILABLE in 2 s), a request waits up to wait_s (and its deadline) for the channel to be ready."""
        if self.channel is None or self.wait_s <= 0:
            return
        if self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        with contextlib.suppress(TimeoutError):  # not back: the call below fails with UNAVAILABLE at once
            await asyncio.wait_for(self.channel.channel_ready(), min(self.wait_s, remaining or self.wait_s))

    async def run_task(self, task: task_pb2.Task, context, on_dispatched: OnDispatched
                       ) -> typing.AsyncIterator[task_pb2.TaskOutput]:
        """The task's outputs until the finished one; a task error is raised as its status."""
        remaining = context.time_remaining()
        if remaining is not None:
            task.deadline_unix_ms = int((time.time() + remaining) * 1000)
        await self._wait_for_scheduler(remaining)
        if remaining is not None:
            remaining = context.time_remaining()
        call = self.scheduler.Submit(timeout=remaining,
                                     metadata=(*tracing.inject().items(), *self.mesh_metadata))
        dispatched = False
        try:
            await call.write(scheduler_pb2.SubmitRequest(task=task))
            async for response in call:
                if response.HasField("dispatched"):
                    dispatched = True
                    on_dispatched(response.dispatched)
                elif response.HasField("output"):
                    output = response.output
                    if output.HasField("error"):
                        raise public_error(code_from_int(output.error.code), output.error.message, task,
                                           dispatched=dispatched)
                    yield output
                    if output.finished:
                        return
            raise public_error(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the task without a result", task,
                               dispatched=dispatched)
        except grpc.aio.AioRpcError as exc:
            raise public_error(exc.code(), exc.details() or "", task, dispatched=dispatched) from None
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
