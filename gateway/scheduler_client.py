"""The scheduler hop: one Submit stream per task, all of a request's tasks concurrently, outputs merged as they come."""

from __future__ import annotations

import asyncio
import time
import typing

import grpc

from llmserve.common import tracing
from llmserve.common.errors import ServiceError, code_from_int
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2

OnDispatched = typing.Callable[[scheduler_pb2.TaskDispatched], None]


class SchedulerClient:
    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerServiceStub):
        self.scheduler = scheduler

    async def run_task(self, task: task_pb2.Task, context, on_dispatched: OnDispatched
                       ) -> typing.AsyncIterator[task_pb2.TaskOutput]:
        """The task's outputs until the finished one; a task error is raised as its status."""
        remaining = context.time_remaining()
        if remaining is not None:
            task.deadline_unix_ms = int((time.time() + remaining) * 1000)
        call = self.scheduler.Submit(timeout=remaining, metadata=tuple(tracing.inject().items()))
        try:
            await call.write(scheduler_pb2.SubmitRequest(task=task))
            async for response in call:
                if response.HasField("dispatched"):
                    on_dispatched(response.dispatched)
                elif response.HasField("output"):
                    output = response.output
                    if output.HasField("error"):
                        raise ServiceError(code_from_int(output.error.code), output.error.message)
                    yield output
                    if output.finished:
                        return
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the task without a result; retry")
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(exc.code(), exc.details() or "scheduler call failed") from None
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
