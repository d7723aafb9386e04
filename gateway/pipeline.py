"""The request pipeline that completions, chat and embeddings share:

    begin:  authenticate -> validate (from_pb) -> resolve the model -> prompt bytes against its context
            -> cap the priority
    run:    response cache -> count prompt tokens once -> context length -> admit (limits, budget, concurrency)
            -> run the tasks on the scheduler -> settle the reservation -> record usage -> cache the result

Everything that can be refused from what the gateway knows is refused before limits, budgets and queues are
touched, and whatever is refused by a size is refused before the text is templated or tokenized. Streaming and
unary responses differ only in what they do with the outputs (on_output) and the Result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing

from llmserve.admin.v1 import registry_pb2
from llmserve.common.config import GatewayConfig
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.state.views import RegistryView
from llmserve.common.structured import ConstraintError, GrammarCompiler
from llmserve.dispatch.v1 import scheduler_pb2, task_pb2
from llmserve.gateway import metrics
from llmserve.gateway.cache import ResponseCache, cache_key
from llmserve.gateway.context import RequestContext
from llmserve.gateway.edge import Edge
from llmserve.gateway.experiments import ExperimentStats
from llmserve.gateway.requests import Call, GenerationCall
from llmserve.gateway.result import Collector, Delta, Result
from llmserve.gateway.scheduler_client import SchedulerClient
from llmserve.gateway.tokens import TokenCounter

KIND_NAMES = {registry_pb2.MODEL_KIND_GENERATE: "generate", registry_pb2.MODEL_KIND_EMBED: "embed"}

OnOutput = typing.Callable[[int, task_pb2.TaskOutput, Delta], typing.Awaitable[None]]


class StreamHeaders:
    """A stream's initial metadata, held back until its first task reaches a worker so that it can name that worker
    (x-llmserve-worker): the REST sidecar writes a server-sent-events response's HTTP headers from it, before any
    output, when the trailer that names every worker is still to come. Sent from the dispatch callback (which cannot
    await), awaited before the first output goes out."""

    def __init__(self, ctx: RequestContext, context):
        self.ctx, self.context = ctx, context
        self.sending: asyncio.Future | None = None

    def dispatched(self) -> None:
        if self.sending is None:
            self.sending = asyncio.ensure_future(self.context.send_initial_metadata(self.ctx.metadata(workers=True)))

    async def sent(self) -> None:
        """Sent, naming no worker when none was dispatched (a stream that failed in the queue)."""
        self.dispatched()
        await typing.cast(asyncio.Future, self.sending)

    def close(self) -> None:
        """The request ended: a send still pending is dropped, a failed one's error retrieved (the call's own
        status is what the caller sees)."""
        if self.sending is None:
            return
        if not self.sending.done():
            self.sending.cancel()
        elif not self.sending.cancelled():
            self.sending.exception()


class Pipeline:
    def __init__(self, cfg: GatewayConfig, view: RegistryView, scheduler: SchedulerClient, cache: ResponseCache,
                 edge: Edge, tokens: TokenCounter, stats: ExperimentStats | None = None):
        self.cfg, self.view, self.scheduler, self.cache, self.edge, self.tokens = (
            cfg, view, scheduler, cache, edge, tokens)
        self._grammars: dict[str, GrammarCompiler] = {}  # per version: constraints compiled once, to refuse early
        self.stats = stats

    def begin(self, ctx: RequestContext, context, parse: typing.Callable[..., Call], request) -> None:
        """Auth, validation, model resolution, the cheap size rules and the priority cap, in that order; fills ctx."""
        ctx.caller = self.edge.authenticate(context)
        call = parse(request, self.cfg)
        ctx.version = self._resolve(call, ctx)
        call.check_prompt_bytes(ctx.version, self.cfg)
        priority, ctx.priority_note = self.edge.cap_priority(ctx.caller, call.priority)
        ctx.call = dataclasses.replace(call, priority=priority) if ctx.priority_note else call

    def _resolve(self, call: Call, ctx: RequestContext) -> registry_pb2.ModelVersion:
        caller = ctx.caller
        assert caller is not None, "authenticated first"
        # Sticky arms: a user (the tenant, when the request names none) stays on its side of a split.
        found = self.view.resolve(call.model, call.user or caller.tenant.name)
        if found is None:
            raise not_found(f"model {call.model!r} not found; ListModels (GET /v1/models) lists the available models")
        version = found.version
        ctx.alias = found.alias
        ctx.on_done = self.stats.record if self.stats is not None else None
        self.edge.authorize_model(caller, call.model, version)
        if version.kind != call.model_kind:
            use = "CreateEmbeddings" if version.kind == registry_pb2.MODEL_KIND_EMBED else "completions or chat"
            raise invalid_argument(f"model {call.model!r} is a {KIND_NAMES.get(version.kind, '?')} model and cannot "
                                   f"serve this request: use {use} with it, or pick another model")
        if version.state == registry_pb2.MODEL_STATE_DISABLED:
            raise failed_precondition(f"model version {version.version!r} is disabled in the registry")
        return version

    async def _check_prompt_ids(self, call: Call, version: registry_pb2.ModelVersion) -> Call:
        """Token-id prompts (or embedding inputs) against the version's vocabulary (INVALID_ARGUMENT naming the first
        id out of range), and their text, which echo returns. Without the version's tokenizer the worker still
        refuses ids outside the model's vocabulary, but echo cannot be served."""
        tokenizer = await self.tokens.tokenizer(version)
        if tokenizer is None:
            if call.echo:
                raise failed_precondition(f"model version {version.version!r} has no tokenizer the gateway can "
                                          "load, which echo of a token-id prompt needs: send the prompt as text")
            return call
        vocab = len(tokenizer)
        for i, ids in enumerate(call.prompt_ids):
            for j, token in enumerate(ids):
                if token >= vocab:
                    raise invalid_argument(f"{call.ids_field}[{i}][{j}]={token} is outside the vocabulary of model "
                                           f"{version.version!r}: token ids are below {vocab}")
        if not isinstance(call, GenerationCall) or not call.echo:
            return call
        texts = await asyncio.to_thread(lambda: tokenizer.batch_decode(
            [list(ids) for ids in call.prompt_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return dataclasses.replace(call, prompts=tuple(texts))

    async def _check_decoding(self, call: GenerationCall, version: registry_pb2.ModelVersion) -> None:
        """logit_bias and stop_token_ids against the version's vocabulary, and the decoding constraint compiled
        with its tokenizer (cached), so that what the worker would refuse is INVALID_ARGUMENT before any limit or
        queue. Without the tokenizer the worker checks both (and refuses the same way)."""
        s = call.sampling
        tokenizer = await self.tokens.tokenizer(version)
        if tokenizer is None:
            return
        vocab = len(tokenizer)
        for name, ids in (("logit_bias", [t for t, _ in s.logit_bias]), ("stop_token_ids", s.stop_token_ids)):
            for token in ids:
                if token >= vocab:
                    raise invalid_argument(f"{name} has token id {token}, outside the vocabulary of model "
                                           f"{version.version!r}: token ids are below {vocab}")
        if s.structured is None:
            return
        try:
            await asyncio.to_thread(self._grammar_compiler(version, tokenizer).compile, s.structured)
        except ConstraintError as exc:
            raise invalid_argument(str(exc)) from None

    def _grammar_compiler(self, version: registry_pb2.ModelVersion, tokenizer) -> GrammarCompiler:
        compiler = self._grammars.get(version.version)
        if compiler is None:
            compiler = self._grammars[version.version] = GrammarCompiler(tokenizer, validation_only=True)
        return compiler

    async def warm_grammars(self, versions) -> None:
        """Builds llguidance's tokenizer for each generation version now (a third of a second to a second per
        tokenizer, holding the GIL, so every request on this gateway would wait for it): at start, not at the
        first constrained request."""
        for version in versions:
            if version.kind != registry_pb2.MODEL_KIND_GENERATE:
                continue
            tokenizer = await self.tokens.tokenizer(version)
            if tokenizer is not None:
                await asyncio.to_thread(self._grammar_compiler(version, tokenizer).warm)

    async def run(self, ctx: RequestContext, context, on_output: OnOutput | None = None) -> Result:
        """The request's Result; on_output(choice index, output, delta) sees live outputs (not on a cache hit). With
        on_output (a stream) the initial metadata waits for the first dispatch and names its worker (StreamHeaders);
        a unary response sends it once admitted and names its workers in the trailer only."""
        caller, call, version = ctx.begun()
        if call.prompt_ids:
            ctx.call = call = await self._check_prompt_ids(call, version)
        if isinstance(call, GenerationCall) and (call.sampling.structured is not None or call.sampling.logit_bias
                                                 or call.sampling.stop_token_ids):
            await self._check_decoding(call, version)
        key = cache_key(caller.tenant.name, version.version, call.cache_fields()) if call.is_cacheable else None
        cached = await self.cache.get(key) if key is not None else None
        ctx.cache = "bypass" if key is None else "hit" if cached else "miss"
        metrics.child(metrics.CACHE, ctx.cache).inc()
        if cached:
            hit = Result.from_json(cached)
            # Counts as a request; holds no concurrency slot (nothing queues or runs for it).
            await self.edge.admit(caller, ctx.request_id, version, 0, 0)
            await context.send_initial_metadata(ctx.metadata())
            await asyncio.shield(self._record(ctx, hit, cache_hit=True, cost_micro=0))
            return hit
        # Tokenized once, only waiting for a tokenizer still loading when a token limit or budget needs the count.
        ctx.counted = await self.tokens.count(version, wait=self.edge.counts_tokens(caller),
                                              **call.count_inputs())
        call.check_context_length(version, ctx.counted)
        reservation = await self.edge.admit(caller, ctx.request_id, version,
                                            ctx.counted.total if ctx.counted else 0, call.max_completion_tokens,
                                            sequences=call.num_sequences)
        # From here to the settlement, no await is outside the try: a cancellation anywhere still settles.
        collector = Collector(call, version.version)
        result: Result | None = None
        headers = StreamHeaders(ctx, context) if on_output is not None else None

        def dispatched(d: scheduler_pb2.TaskDispatched) -> None:
            ctx.note_dispatched(d.worker_id, d.queue_time_ms)
            if headers is not None:
                headers.dispatched()
        try:
            if headers is None:
                await context.send_initial_metadata(ctx.metadata())
            tasks = call.to_tasks(ctx.request_id, version.version, cache_salt=caller.tenant.name,
                                  counted=ctx.counted)
            async for task_index, output in self.scheduler.run_all(tasks, context, dispatched):
                index = task_index * call.n + output.index  # the choice: input * n + choice
                delta = collector.add(index, output)
                if ctx.first_token_s is None and delta.text:
                    ctx.first_token_s = time.perf_counter() - ctx.started
                if on_output is not None and headers is not None:
                    await headers.sent()
                    await on_output(index, output, delta)
            result = collector.result()
        except Exception:
            if headers is not None:  # a stream refused after admission still says which request it was
                with contextlib.suppress(Exception):  # the call may be over already
                    await headers.sent()
            raise
        finally:
            if headers is not None:
                headers.close()
            if ctx.workers:
                context.set_trailing_metadata(ctx.trailing_metadata())
            # Settle what was really computed, also when the request failed or the client went away.
            # Usage first (no await), then the settlement in its own task, which a cancellation cannot stop.
            done = result or collector.result()
            recorded = self._record(ctx, done, cache_hit=False,
                                    cost_micro=self.edge.cost(version, done.prompt_tokens, done.completion_tokens))
            await self.edge.settle(reservation, version, done.prompt_tokens, done.completion_tokens)
        await asyncio.shield(recorded)  # acknowledged only once its usage is durable (Redis or the journal)
        if key is not None:
            await self.cache.put(key, done.to_json())
        return done

    def _record(self, ctx: RequestContext, result: Result, *, cache_hit: bool, cost_micro: int) -> asyncio.Future:
        ctx.prompt_tokens, ctx.completion_tokens = result.prompt_tokens, result.completion_tokens
        caller, _, version = ctx.begun()
        computed = (0, 0) if cache_hit else (result.prompt_tokens, result.completion_tokens)
        return self.edge.record(caller, version.version, prompt_tokens=computed[0], completion_tokens=computed[1],
                                cached_tokens=result.prompt_tokens + result.completion_tokens if cache_hit
                                else result.cached_tokens, cache_hit=cache_hit, cost_micro=cost_micro)
