"""InferenceService: the public API. Auth, validation, alias routing, response cache, fan-out to the scheduler.

A request becomes one scheduler task per generated sequence (prompt x n) or one task per embeddings call; the
tasks run concurrently over Submit streams and their outputs are merged back into OpenAI-shaped responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing
import uuid

import grpc
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from llmserve.admin.v1 import registry_pb2
from llmserve.common.errors import ServiceError, code_from_int, failed_precondition, invalid_argument, not_found
from llmserve.common import tracing
from llmserve.common.logs import get_logger
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2
from llmserve.gateway import metrics
from llmserve.gateway.cache import ResponseCache, cache_key
from llmserve.gateway.requests import GenerationCall, chat_from_pb, completion_from_pb
from llmserve.gateway.requests import embeddings_from_pb
from llmserve.gateway.edge import Caller, Edge
from llmserve.gateway.tokens import TokenCounter
from llmserve.common.config import GatewayConfig
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from llmserve.registry.store import RegistryView, Resolution

log = get_logger(__name__)
tracer = tracing.tracer(__name__)

KIND_NAMES = {registry_pb2.MODEL_KIND_GENERATE: "generate", registry_pb2.MODEL_KIND_EMBED: "embed"}


class Result(typing.NamedTuple):
    """A finished generation: what the cache stores and what responses are built from."""
    choices: list[tuple[str, str]]  # (text, finish_reason) by choice index
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the workers' prefix cache did not compute again

    def to_json(self) -> dict:
        return {"choices": self.choices, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        # Served from the response cache: no prompt token is computed again.
        return cls([tuple(c) for c in data["choices"]], data["prompt_tokens"], data["completion_tokens"],
                   data["prompt_tokens"])

    def usage(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        total_tokens=self.prompt_tokens + self.completion_tokens,
                        prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=self.cached_tokens))


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, cfg: GatewayConfig, view: RegistryView, scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
                 cache: ResponseCache, edge: Edge, tokens: TokenCounter):
        self.cfg, self.view, self.scheduler, self.cache, self.edge, self.tokens = (
            cfg, view, scheduler, cache, edge, tokens)

    # ---- request edges ----

    def _resolve(self, name: str, user: str, kind: int, caller: Caller) -> Resolution:
        found = self.view.resolve(name, user)
        if found is None:
            raise not_found(f"model {name!r} not found; ListModels (GET /v1/models) lists the available models")
        version = found.version
        self.edge.authorize_model(caller, name, version)
        if version.kind != kind:
            use = "CreateEmbeddings" if version.kind == registry_pb2.MODEL_KIND_EMBED else "completions or chat"
            raise invalid_argument(f"model {name!r} is a {KIND_NAMES.get(version.kind, '?')} model and cannot serve "
                                   f"this request: use {use} with it, or pick another model")
        if version.state == registry_pb2.MODEL_STATE_DISABLED:
            raise failed_precondition(f"model version {version.version!r} is disabled in the registry")
        return found

    def _begin(self, context, info: dict, parse, request, kind: int):
        """Auth, validation, model resolution and the priority cap, in that order."""
        caller = self.edge.authenticate(context)
        call = parse(request, self.cfg)
        res = self._resolve(call.model, call.user, kind, caller)
        priority, note = self.edge.cap_priority(caller, call.priority)
        if note:
            info["priority"] = note
            call = dataclasses.replace(call, priority=priority)
        return caller, call, res

    @contextlib.asynccontextmanager
    async def _observe(self, method: str, context) -> typing.AsyncIterator[dict]:
        """Request id, latency, status-code counting and one summary log line per request (never content)."""
        request_id = uuid.uuid4().hex[:24]
        structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
        info: dict = {"request_id": request_id}
        started = time.perf_counter()
        code = "OK"
        span = tracer.start_span(f"InferenceService/{method}", kind=trace.SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield info
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
            span.set_attributes({"llmserve.request_id": request_id, "rpc.grpc.status": code,
                                 **{f"llmserve.{k}": v for k, v in info.items()
                                    if k in ("model_version", "cache", "prompt_tokens", "completion_tokens")}})
            if code != "OK":
                span.set_status(trace.Status(trace.StatusCode.ERROR, code))
            span.end()
            otel_context.detach(token)
            metrics.REQUESTS.labels(method, code).inc()
            metrics.LATENCY.labels(method).observe(elapsed)
            log.info("request", code=code, ms=round(elapsed * 1000, 1),
                     **{k: v for k, v in info.items() if k != "request_id"})

    async def _send_metadata(self, context, info: dict) -> None:
        metadata = [("x-request-id", info["request_id"]),
                    ("x-llmserve-model-version", info.get("model_version", "")),
                    ("x-llmserve-cache", info.get("cache", "bypass"))]
        if "priority" in info:
            metadata.append(("x-llmserve-priority", info["priority"]))
        await context.send_initial_metadata(metadata)

    # ---- the scheduler hop ----

    async def _run_task(self, task: task_pb2.Task, context) -> typing.AsyncIterator[task_pb2.TaskOutput]:
        remaining = context.time_remaining()
        if remaining is not None:
            task.deadline_unix_ms = int((time.time() + remaining) * 1000)
        call = self.scheduler.Submit(timeout=remaining, metadata=tuple(tracing.inject().items()))
        try:
            await call.write(scheduler_pb2.SubmitRequest(task=task))
            async for response in call:
                if response.HasField("output"):
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

    async def _generate(self, call: GenerationCall, version: str, request_id: str, context
                        ) -> typing.AsyncIterator[tuple[int, task_pb2.TaskOutput]]:
        """Runs every sequence of the call concurrently; yields (choice index, output) as they arrive."""
        s = call.sampling
        tasks = []
        for i in range(call.num_inputs):
            for j in range(call.n):
                seed = None if s.seed is None else (s.seed + j) & ((1 << 63) - 1)
                sampling = task_pb2.SamplingParams(
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, has_seed=seed is not None,
                    seed=seed or 0, max_tokens=s.max_tokens, stop=s.stop, ignore_eos=s.ignore_eos,
                    max_tokens_is_default=s.max_tokens_is_default)
                if call.kind == "chat":
                    gen = task_pb2.GenerateInput(
                        messages=[pb.ChatMessage(role=r, content=c) for r, c in call.messages], sampling=sampling)
                else:
                    gen = task_pb2.GenerateInput(prompt=call.prompts[i], sampling=sampling)
                tasks.append(task_pb2.Task(request_id=f"{request_id}-{i * call.n + j}", model_version=version,
                                           priority=call.priority, generate=gen))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, task: task_pb2.Task) -> None:
            try:
                async for output in self._run_task(task, context):
                    queue.put_nowait((index, output))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
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

    async def _complete(self, call: GenerationCall, res: Resolution, caller: Caller, info: dict, context,
                        on_output=None) -> tuple[Result, bool]:
        """Cache lookup, else admission (limits, budget) and generation, then settlement and usage.
        on_output(index, output) sees live outputs. Returns (result, cache_hit)."""
        version = res.version
        info.update(model_version=version.version, kind=call.kind, n=call.n, num_inputs=call.num_inputs)
        key = None
        if call.sampling.is_deterministic and not call.skip_cache:
            key = cache_key(caller.tenant.name, version.version, call.cache_fields())
            cached = await self.cache.get(key)
            info["cache"] = "hit" if cached else "miss"
            metrics.CACHE.labels(info["cache"]).inc()
            if cached:
                result = Result.from_json(cached)
                await self.edge.admit(caller, info["request_id"], version, 0, 0)  # counts as a request
                await self._send_metadata(context, info)
                self._record(caller, version.version, info, result, cache_hit=True, cost_micro=0)
                return result, True
        else:
            metrics.CACHE.labels("bypass").inc()
        counts = [0]  # tokenizing at the gateway costs milliseconds: only when a token limit or budget needs it
        if self.edge.counts_tokens(caller):
            counts = await self.tokens.count(version, texts=call.prompts,
                                             messages=call.messages if call.kind == "chat" else None)
        admission = await self.edge.admit(caller, info["request_id"], version, sum(counts),
                                          call.n * call.num_inputs * call.sampling.max_tokens)
        await self._send_metadata(context, info)
        texts = [[] for _ in range(call.num_inputs * call.n)]
        reasons = [""] * len(texts)
        prompt_tokens = [0] * len(texts)
        completion_tokens = [0] * len(texts)
        cached_tokens = [0] * len(texts)
        started = time.perf_counter()
        last_delta: dict[int, float] = {}  # choice index -> when its previous delta arrived
        result = None
        try:
            async for index, output in self._generate(call, version.version, info["request_id"], context):
                if output.text_delta:
                    now = time.perf_counter()
                    if not last_delta:
                        metrics.TTFT.labels(version.version).observe(now - started)
                    if index in last_delta:
                        metrics.INTER_TOKEN.labels(version.version).observe(now - last_delta[index])
                    last_delta[index] = now
                texts[index].append(output.text_delta)
                prompt_tokens[index] = output.prompt_tokens
                completion_tokens[index] = output.completion_tokens
                cached_tokens[index] = output.cached_tokens
                if output.finished:
                    reasons[index] = output.finish_reason
                if on_output is not None:
                    await on_output(index, output)
            # The prompt is counted once per input, not once per choice (as OpenAI does).
            firsts = range(0, len(texts), call.n)
            result = Result([("".join(t), r) for t, r in zip(texts, reasons)], sum(prompt_tokens[i] for i in firsts),
                            sum(completion_tokens), sum(cached_tokens[i] for i in firsts))
        finally:
            # Settle what was really computed, also when the request failed or the client went away.
            done = result or Result([], sum(prompt_tokens[i] for i in range(0, len(texts), call.n)),
                                    sum(completion_tokens))
            cost = await self.edge.settle(caller, admission, version, done.prompt_tokens, done.completion_tokens)
            self._record(caller, version.version, info, done, cache_hit=False, cost_micro=cost)
        if key is not None:
            await self.cache.put(key, result.to_json())
        return result, False

    def _record(self, caller: Caller, version: str, info: dict, result: Result, *, cache_hit: bool,
                      cost_micro: int) -> None:
        info.update(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        computed = (0, 0) if cache_hit else (result.prompt_tokens, result.completion_tokens)
        self.edge.record(caller, version, prompt_tokens=computed[0], completion_tokens=computed[1],
                         cached_tokens=result.prompt_tokens + result.completion_tokens if cache_hit
                         else result.cached_tokens, cache_hit=cache_hit, cost_micro=cost_micro)

    # ---- RPCs ----

    async def CreateCompletion(self, request, context):
        async with self._observe("CreateCompletion", context) as info:
            caller, call, res = self._begin(context, info, completion_from_pb, request,
                                            registry_pb2.MODEL_KIND_GENERATE)
            result, _ = await self._complete(call, res, caller, info, context)
            return pb.CreateCompletionResponse(
                id=f"cmpl-{info['request_id']}", object="text_completion", created=int(time.time()),
                model=res.version.version, usage=result.usage(),
                choices=[pb.CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in
                         enumerate(result.choices)])

    async def CreateChatCompletion(self, request, context):
        async with self._observe("CreateChatCompletion", context) as info:
            caller, call, res = self._begin(context, info, chat_from_pb, request, registry_pb2.MODEL_KIND_GENERATE)
            result, _ = await self._complete(call, res, caller, info, context)
            return pb.CreateChatCompletionResponse(
                id=f"chatcmpl-{info['request_id']}", object="chat.completion", created=int(time.time()),
                model=res.version.version, usage=result.usage(),
                choices=[pb.ChatChoice(index=i, message=pb.ChatMessage(role="assistant", content=t), finish_reason=r)
                         for i, (t, r) in enumerate(result.choices)])

    async def _stream(self, method: str, parse, chunk_choice, response_cls, object_name: str, id_prefix: str,
                      request, context):
        async with self._observe(method, context) as info:
            caller, call, res = self._begin(context, info, parse, request, registry_pb2.MODEL_KIND_GENERATE)
            header = dict(id=f"{id_prefix}-{info['request_id']}", object=object_name, created=int(time.time()),
                          model=res.version.version)
            chunks: asyncio.Queue = asyncio.Queue()
            started: set[int] = set()
            include_usage = not request.HasField("stream_options") or request.stream_options.include_usage

            async def on_output(index: int, output: task_pb2.TaskOutput) -> None:
                if output.text_delta or output.finished:
                    is_first = index not in started
                    started.add(index)
                    chunks.put_nowait(response_cls(**header, choices=[
                        chunk_choice(index, output.text_delta, output.finish_reason, is_first)]))

            async def produce():
                try:
                    result, hit = await self._complete(call, res, caller, info, context, on_output)
                    if hit:  # replay the cached answer as one chunk per choice
                        for index, (text, reason) in enumerate(result.choices):
                            chunks.put_nowait(response_cls(**header, choices=[chunk_choice(index, text, reason, True)]))
                    if include_usage:
                        chunks.put_nowait(response_cls(**header, usage=result.usage()))
                finally:
                    chunks.put_nowait(None)

            producer = asyncio.create_task(produce())
            try:
                while (chunk := await chunks.get()) is not None:
                    yield chunk
                await producer  # re-raises a failure of the generation
            finally:
                producer.cancel()

    def StreamCompletion(self, request, context):
        def choice(index, text, reason, _first):
            return pb.CompletionChoice(index=index, text=text, finish_reason=reason)
        return self._stream("StreamCompletion", completion_from_pb, choice, pb.StreamCompletionResponse,
                            "text_completion", "cmpl", request, context)

    def StreamChatCompletion(self, request, context):
        def choice(index, text, reason, first):
            return pb.ChatChunkChoice(index=index, finish_reason=reason,
                                      delta=pb.ChatDelta(role="assistant" if first else "", content=text))
        return self._stream("StreamChatCompletion", chat_from_pb, choice, pb.StreamChatCompletionResponse,
                            "chat.completion.chunk", "chatcmpl", request, context)

    async def CreateEmbeddings(self, request, context):
        async with self._observe("CreateEmbeddings", context) as info:
            caller, call, res = self._begin(context, info, embeddings_from_pb, request, registry_pb2.MODEL_KIND_EMBED)
            version = res.version
            info.update(model_version=version.version, num_inputs=len(call.inputs))
            cached, key = None, None
            if not call.skip_cache:  # embeddings are deterministic: always cacheable
                key = cache_key(caller.tenant.name, version.version, call.cache_fields())
                cached = await self.cache.get(key)
                info["cache"] = "hit" if cached else "miss"
            metrics.CACHE.labels(info.get("cache", "bypass")).inc()
            if cached:
                await self.edge.admit(caller, info["request_id"], version, 0, 0)
                vectors, tokens = cached["vectors"], cached["prompt_tokens"]
                await self._send_metadata(context, info)
                self._record(caller, version.version, info, Result([], tokens, 0), cache_hit=True, cost_micro=0)
            else:
                counts = await self.tokens.count(version, texts=call.inputs) if self.edge.counts_tokens(caller) \
                    else [0]
                admission = await self.edge.admit(caller, info["request_id"], version, sum(counts), 0)
                await self._send_metadata(context, info)
                task = task_pb2.Task(request_id=f"{info['request_id']}-0", model_version=version.version,
                                     priority=call.priority, embed=task_pb2.EmbedInput(texts=call.inputs))
                output = None
                try:
                    async for output in self._run_task(task, context):
                        pass
                finally:
                    tokens = output.prompt_tokens if output is not None else 0
                    cost = await self.edge.settle(caller, admission, version, tokens, 0)
                    self._record(caller, version.version, info, Result([], tokens, 0), cache_hit=False,
                                       cost_micro=cost)
                vectors = [list(v.values) for v in output.embeddings]
                if key:
                    await self.cache.put(key, {"vectors": vectors, "prompt_tokens": tokens})
            return pb.CreateEmbeddingsResponse(
                object="list", model=version.version,
                usage=pb.EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
                data=[pb.Embedding(index=i, object="embedding", embedding=v) for i, v in enumerate(vectors)])

    async def ListModels(self, request, context):
        async with self._observe("ListModels", context):
            tenant = self.edge.authenticate(context).tenant
            versions = self.view.versions.snapshot
            data = []
            for alias in sorted(self.view.aliases.snapshot.values(), key=lambda a: a.name):
                if not self.edge.may_use(tenant, alias.name):
                    continue
                first = versions.get(alias.targets[0].version) if alias.targets else None
                data.append(pb.Model(
                    id=alias.name, object="model", created=alias.updated, owned_by="llmserve",
                    kind=KIND_NAMES.get(first.kind, "") if first else "",
                    context_length=first.context_length if first else 0,
                    targets=[pb.TrafficTarget(version=t.version, weight=t.weight) for t in alias.targets]))
            for v in sorted(versions.values(), key=lambda v: v.version):
                if v.state != registry_pb2.MODEL_STATE_DISABLED and self.edge.may_use(tenant, v.version):
                    data.append(pb.Model(id=v.version, object="model", created=v.created, owned_by="llmserve",
                                         kind=KIND_NAMES.get(v.kind, ""), context_length=v.context_length))
            return pb.ListModelsResponse(object="list", data=data)


def inference_service_name() -> str:
    return pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
