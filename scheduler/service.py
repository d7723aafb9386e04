"""SchedulerService: admission of the gateway's Submit streams into the dispatcher, and relay of outputs."""

from __future__ import annotations

import asyncio
import typing

import grpc
from opentelemetry import trace

from llmserve.common import priority, tracing
from llmserve.common.errors import SCHEDULER_ANSWERED, ServiceError, invalid_argument
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmserve.scheduler.dispatcher import Dispatcher
from llmserve.scheduler.queue import Entry

tracer = tracing.tracer(__name__)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, dispatcher: Dispatcher, *, max_backlog: int = 1024, slow_consumer_timeout_s: float = 30.0):
        self.dispatcher = dispatcher
        self.max_backlog, self.slow_consumer_timeout_s = max_backlog, slow_consumer_timeout_s

    async def Submit(self, request_iterator, context) -> typing.AsyncIterator[scheduler_pb2.SubmitResponse]:
        context.set_trailing_metadata((SCHEDULER_ANSWERED,))  # whatever ends the stream, this scheduler said it
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "task":
            raise invalid_argument("the first message of Submit must be a task")
        task = first.task
        if not task.request_id or not task.model_version or task.WhichOneof("input") is None:
            raise invalid_argument("task.request_id, task.model_version and task input are required")
        try:
            entry = Entry(task, priority=priority.from_pb(task.priority), max_backlog=self.max_backlog,
                          slow_consumer_timeout_s=self.slow_consumer_timeout_s)
        except ValueError as exc:
            raise invalid_argument(f"task.{exc}") from None
        span = tracer.start_span("SchedulerService/Submit", kind=trace.SpanKind.SERVER,
                                 context=tracing.extract(dict(context.invocation_metadata() or ())),
                                 attributes={"llmserve.request_id": task.request_id,
                                             "llmserve.model_version": task.model_version})
        task.trace_context.clear()
        task.trace_context.update(tracing.inject(span))  # the worker's span joins the request's trace
        try:
            self.dispatcher.submit(entry)
        except ServiceError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code.name))
            span.end()
            raise

        async def read_cancels() -> None:
            async for message in request_iterator:
                if message.WhichOneof("kind") == "cancel":
                    self.dispatcher.cancel(entry)
                    entry.outbox.put_nowait(ServiceError(grpc.StatusCode.CANCELLED, "cancelled by the caller"))
                    return

        reader = asyncio.create_task(read_cancels())
        finished = False
        try:
            while True:
                item = await entry.read()
                if isinstance(item, ServiceError):
                    finished = True
                    span.set_status(trace.Status(trace.StatusCode.ERROR, item.code.name))
                    raise item
                if isinstance(item, scheduler_pb2.TaskDispatched):
                    span.add_event("dispatched", {"worker_id": item.worker_id, "queue_time_ms": item.queue_time_ms})
                    yield scheduler_pb2.SubmitResponse(dispatched=item)
                    continue
                yield scheduler_pb2.SubmitResponse(output=item)
                if item.finished:
                    finished = True
                    return
        finally:
            reader.cancel()
            if not finished:  # the caller went away (or its deadline passed): free the worker's slot
                self.dispatcher.cancel(entry)
            span.end()


def scheduler_service_name() -> str:
    return scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
