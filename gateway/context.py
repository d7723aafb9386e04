"""One request's record as it passes the gateway, and the observation around it: request id, latency, status-code
counting, one span and one summary log line per request (never content)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing
import uuid

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from llmserve.admin.v1 import registry_pb2
from llmserve.common import tracing
from llmserve.common.errors import ServiceError
from llmserve.common.logs import get_logger
from llmserve.gateway import metrics
from llmserve.gateway.edge import Caller
from llmserve.gateway.requests import Call
from llmserve.gateway.tokens import TokenCount

log = get_logger(__name__)
tracer = tracing.tracer(__name__)


@dataclasses.dataclass
class RequestContext:
    """Filled in step by step: begin() sets caller, call and version; the pipeline the rest."""
    request_id: str
    caller: Caller | None = None
    call: Call | None = None  # validated, with the priority the caller's tenant is allowed
    version: registry_pb2.ModelVersion | None = None  # the concrete version the alias resolved to
    priority_note: str = ""  # set when the tenant's cap changed the priority: "<used> (capped from <asked>)"
    cache: str = ""  # response cache: "hit", "miss" or "bypass", once looked up
    counted: TokenCount | None = None  # prompt tokens counted at the gateway (None: not counted)
    queue_ms: float | None = None  # longest time one of its tasks waited in the scheduler's queue
    prompt_tokens: int | None = None  # usage, once known
    completion_tokens: int | None = None
    workers: list[str] = dataclasses.field(default_factory=list)  # ids of the workers its tasks ran on
    alias: str = ""  # the alias the caller named, when it named one (the A/B arm is (alias, version))
    started: float = 0.0  # time.perf_counter() when the request arrived
    first_token_s: float | None = None  # time to the first generated text
    # Called once the request ended, with (ctx, status code name, seconds): the A/B statistics (set on resolve).
    on_done: typing.Callable[[RequestContext, str, float], None] | None = None

    def begun(self) -> tuple[Caller, Call, registry_pb2.ModelVersion]:
        """(caller, call, version), which Pipeline.begin sets before anything else reads them."""
        if self.caller is None or self.call is None or self.version is None:
            raise RuntimeError("RequestContext read before Pipeline.begin filled it")
        return self.caller, self.call, self.version

    def note_queue_time(self, ms: float) -> None:
        self.queue_ms = ms if self.queue_ms is None else max(self.queue_ms, ms)

    def note_dispatched(self, worker_id: str, queue_time_ms: float) -> None:
        """A task reached a worker (again, when the scheduler migrated it after its worker was lost)."""
        self.note_queue_time(queue_time_ms)
        if worker_id and worker_id not in self.workers:
            self.workers.append(worker_id)

    def trailing_metadata(self) -> list[tuple[str, str]]:
        """Trailing response metadata: the workers that served the request, in dispatch order (several with
        several prompts, or after a migration); none for a response-cache hit."""
        return [("x-llmserve-worker", ",".join(self.workers))] if self.workers else []

    def metadata(self, *, workers: bool = False) -> list[tuple[str, str]]:
        """Initial response metadata: what served the request; with workers, also the workers its tasks reached so
        far, in x-llmserve-worker (a stream's, whose REST headers are written before any output: the trailer alone
        would come too late). A worker's identity goes in no other entry."""
        metadata = [("x-request-id", self.request_id),
                    ("x-llmserve-model-version", self.version.version if self.version else ""),
                    ("x-llmserve-cache", self.cache or "bypass")]
        if self.priority_note:
            metadata.append(("x-llmserve-priority", self.priority_note))
        if workers:
            metadata.extend(self.trailing_metadata())
        return metadata

    def summary(self) -> dict[str, typing.Any]:
        """Fields of the request's log line and span (counts and names only, never content)."""
        fields: dict[str, typing.Any] = {}
        if self.version is not None:
            fields["model_version"] = self.version.version
        if self.call is not None:
            fields.update(kind=self.call.kind, n=self.call.n, num_inputs=self.call.num_inputs)
        if self.cache:
            fields["cache"] = self.cache
        if self.priority_note:
            fields["priority"] = self.priority_note
        if self.queue_ms is not None:
            fields["queue_ms"] = round(self.queue_ms, 1)
        if self.prompt_tokens is not None:
            fields.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return fields


SPAN_FIELDS = ("model_version", "cache", "queue_ms", "prompt_tokens", "completion_tokens")


@contextlib.asynccontextmanager
async def observe(method: str) -> typing.AsyncIterator[RequestContext]:
    request_id = uuid.uuid4().hex[:24]
    structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
    ctx = RequestContext(request_id)
    started = ctx.started = time.perf_counter()
    code = "OK"
    span = tracer.start_span(f"InferenceService/{method}", kind=trace.SpanKind.SERVER)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield ctx
    except ServiceError as exc:
        code = exc.code.name
        raise
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception:
        code = "INTERNAL"
        raise
    finally:
        elapsed = time.perf_counter() - started
        summary = ctx.summary()
        span.set_attributes({"llmserve.request_id": request_id, "rpc.grpc.status": code,
                             **{f"llmserve.{k}": v for k, v in summary.items() if k in SPAN_FIELDS}})
        if code != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()
        otel_context.detach(token)
        metrics.child(metrics.REQUESTS, method, code).inc()
        metrics.child(metrics.LATENCY, method).observe(elapsed)
        log.info("request", code=code, ms=round(elapsed * 1000, 1), **summary)
        if ctx.on_done is not None:
            ctx.on_done(ctx, code, elapsed)
