"""WorkerService: the scheduler's bidirectional stream into this worker's engines.

Each Serve stream multiplexes tasks by request_id. A task runs as its own asyncio task; a CancelTask, or the
stream breaking, cancels it, which aborts the sequence in the engine (its slot is freed within one step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import typing

import grpc

from llmserve.admin.v1 import registry_pb2
from llmserve.common import priority, tracing
from llmserve.common.errors import ServiceError
from llmserve.common.logs import get_logger
from llmserve.common.structured import Constraint, ConstraintError
from llmserve.common.tools import message_from_pb, spec_from_pb
from llmserve.dispatch.v1 import task_pb2, worker_pb2, worker_pb2_grpc
from llmserve.worker import metrics
from llmserve.worker.engine.contract import (
    EmbeddingEngine,
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)

log = get_logger(__name__)
tracer = tracing.tracer(__name__)


@dataclasses.dataclass
class ServedModel:
    """A registry version and the engine serving it (only the contract's Protocols are known here)."""

    version: registry_pb2.ModelVersion
    engine: GenerationEngine | EmbeddingEngine
    adapter: str = ""  # a LoRA adapter version: the name its base's engine knows it by

    @property
    def is_embedding(self) -> bool:
        return self.version.kind == registry_pb2.MODEL_KIND_EMBED

    @property
    def context_length(self) -> int:
        limit = self.engine.context_length
        return min(self.version.context_length or limit, limit)

    @property
    def max_num_seqs(self) -> int:
        return self.engine.max_num_seqs

    def load(self) -> task_pb2.ModelLoad:
        load = self.engine.load()
        stats = self.engine.stats()
        return task_pb2.ModelLoad(model_version=self.version.version, num_running=load.num_running,
                                  num_waiting=load.num_waiting, max_num_seqs=self.max_num_seqs,
                                  num_kv_blocks=stats.num_kv_blocks, num_free_kv_blocks=stats.num_free_kv_blocks)


SEED_MASK = (1 << 63) - 1


def sampling_from_pb(s: task_pb2.SamplingParams, max_tokens: int, choice: int = 0,
                     structured: typing.Any = None) -> SamplingParams:
    """The sampling parameters of one choice as the engine takes them (max_tokens already fitted to the context,
    the constraint compiled): choice j draws from seed + j, so choices differ and each reproduces."""
    return SamplingParams(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                          seed=(s.seed + choice) & SEED_MASK if s.has_seed else None, max_tokens=max_tokens,
                          stop=list(s.stop), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
                          top_logprobs=max(0, min(s.top_logprobs, MAX_TOP_LOGPROBS)),
                          prompt_logprobs=s.prompt_logprobs, presence_penalty=s.presence_penalty,
                          frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty or 1.0,
                          logit_bias=dict(s.logit_bias), min_tokens=max(0, s.min_tokens),
                          stop_token_ids=list(s.stop_token_ids), structured=structured)


def check_sampling(s: task_pb2.SamplingParams, vocab_size: int | None) -> None:
    """What the gateway validates, checked again where the numbers are used (ServiceError INVALID_ARGUMENT)."""
    def bad(message: str) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)

    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -2.0 <= value <= 2.0:  # NaN fails too
            raise bad(f"{name}={value} is out of range: it must be between -2 and 2")
    if not (s.repetition_penalty == 0 or 0 < s.repetition_penalty <= 2.0):
        raise bad(f"repetition_penalty={s.repetition_penalty} is out of range: it must be in (0, 2] (1 disables it)")
    for token, bias in s.logit_bias.items():
        if not -100.0 <= bias <= 100.0:
            raise bad(f"logit_bias[{token}]={bias} is out of range: a bias must be between -100 and 100")
    if s.min_tokens < 0:
        raise bad(f"min_tokens={s.min_tokens} is negative")
    if vocab_size is not None:
        for name, ids in (("logit_bias", list(s.logit_bias)), ("stop_token_ids", list(s.stop_token_ids))):
            outside = [t for t in ids if not 0 <= t < vocab_size]
            if outside:
                raise bad(f"{name} has token id {outside[0]}, outside the vocabulary (0..{vocab_size - 1})")


MAX_TOP_LOGPROBS = 20


def logprobs_to_pb(entries: list[TokenLogprob]) -> list[task_pb2.TokenLogprob]:
    return [task_pb2.TokenLogprob(token_id=e.token_id, logprob=e.logprob or 0.0, token=e.token,
                                  top=[task_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token)
                                       for t in e.top])
            for e in entries]


def _error(request_id: str, code: grpc.StatusCode, message: str) -> task_pb2.TaskOutput:
    return task_pb2.TaskOutput(request_id=request_id, finished=True,
                               error=task_pb2.TaskError(code=code.value[0], message=message))


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker_id: str, models: dict[str, ServedModel], load_report_interval_s: float = 1.0, *,
                 max_outbox_messages: int = 4096, stalled_stream_timeout_s: float = 30.0):
        self.worker_id = worker_id
        self.models = models
        self.load_report_interval_s = load_report_interval_s
        self.max_outbox_messages = max_outbox_messages
        self.stalled_stream_timeout_s = stalled_stream_timeout_s

    def load_report(self) -> task_pb2.LoadReport:
        return task_pb2.LoadReport(worker_id=self.worker_id, models=[m.load() for m in self.models.values()])

    async def Serve(self, request_iterator, context):
        # Bounded: when the scheduler stops reading, tasks wait to queue their outputs (and stop pulling from the
        # engine), and one that waits longer than stalled_stream_timeout_s is cancelled.
        outbox: asyncio.Queue[worker_pb2.ServeResponse | None] = asyncio.Queue(self.max_outbox_messages)
        running: dict[str, asyncio.Task] = {}
        load_changed = asyncio.Event()

        async def run_task(task: task_pb2.Task) -> None:
            try:
                async with contextlib.aclosing(self.execute(task)) as outputs:  # closed (engine aborted) on any exit
                    async for output in outputs:
                        try:
                            await asyncio.wait_for(outbox.put(worker_pb2.ServeResponse(output=output)),
                                                   self.stalled_stream_timeout_s)
                        except TimeoutError:
                            log.warning("scheduler stream stalled; task cancelled", request_id=task.request_id,
                                        stalled_s=self.stalled_stream_timeout_s)
                            return
            finally:
                running.pop(task.request_id, None)
                load_changed.set()

        async def read() -> None:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "task":
                    request_id = message.task.request_id
                    if request_id in running:
                        await outbox.put(worker_pb2.ServeResponse(output=_error(
                            request_id, grpc.StatusCode.ALREADY_EXISTS, f"task {request_id} is already running")))
                        continue
                    running[request_id] = asyncio.create_task(run_task(message.task))
                    load_changed.set()
                elif kind == "cancel":
                    task = running.get(message.cancel.request_id)
                    if task is not None:
                        task.cancel()
            # The scheduler closed its side: finish what runs, then end the stream.
            await asyncio.gather(*running.values(), return_exceptions=True)
            await outbox.put(None)

        async def report() -> None:
            while True:
                if not outbox.full():  # a stalled stream skips reports; the next one is current again
                    outbox.put_nowait(worker_pb2.ServeResponse(load=self.load_report()))
                load_changed.clear()
                try:
                    await asyncio.wait_for(load_changed.wait(), self.load_report_interval_s)
                    await asyncio.sleep(0.01)  # coalesce bursts of starts and finishes into one report
                except TimeoutError:
                    pass

        kv = _KvPublisher(self.models, outbox, asyncio.get_running_loop())
        reader = asyncio.create_task(read())
        reporter = asyncio.create_task(report())
        # The peer is read once, now: grpc core's peer string can be freed once the call is cancelled, and reading
        # it then (in the finally below) crashed the process (use after free, grpc/grpc#29069).
        peer = context.peer()
        log.info("scheduler stream opened", peer=peer)
        try:
            while True:
                item = await outbox.get()
                if item is None:
                    break
                yield item
        finally:
            kv.close()
            reader.cancel()
            reporter.cancel()
            for task in list(running.values()):
                task.cancel()
            if running:
                log.warning("scheduler stream closed; cancelled its tasks", num_tasks=len(running))
            log.info("scheduler stream closed", peer=peer)

    async def execute(self, task: task_pb2.Task) -> typing.AsyncGenerator[task_pb2.TaskOutput, None]:
        """Runs one task; every failure becomes a final TaskOutput with a status code (never a broken stream)."""
        model = self.models.get(task.model_version)
        if model is None:
            yield _error(task.request_id, grpc.StatusCode.UNAVAILABLE,
                         f"the worker it was sent to does not serve model version {task.model_version!r}")
            return
        if task.deadline_unix_ms and time.time() * 1000 > task.deadline_unix_ms:
            yield _error(task.request_id, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the task started")
            return
        span = tracer.start_span("WorkerService/task", context=tracing.extract(task.trace_context),
                                 attributes={"llmserve.request_id": task.request_id,
                                             "llmserve.model_version": task.model_version})
        try:
            kind = task.WhichOneof("input")
            if kind == "generate" and not model.is_embedding:
                async for output in self._generate(model, task):
                    if output.finished:
                        span.set_attributes({"llmserve.prompt_tokens": output.prompt_tokens,
                                             "llmserve.completion_tokens": output.completion_tokens,
                                             "llmserve.cached_tokens": output.cached_tokens})
                    yield output
            elif kind == "embed" and model.is_embedding:
                yield await self._embed(model, task)
            else:
                yield _error(task.request_id, grpc.StatusCode.INVALID_ARGUMENT,
                             f"model {model.version.version!r} cannot run a {kind!r} task")
        except ServiceError as exc:
            yield _error(task.request_id, exc.code, exc.message)
        except Exception:  # a failing task must not take the stream down
            log.exception("task failed", request_id=task.request_id)
            yield _error(task.request_id, grpc.StatusCode.INTERNAL,
                         f"internal error in the worker running request {task.request_id}; it is logged there")
        finally:
            span.end()

    async def _generate(self, model: ServedModel, task: task_pb2.Task) -> typing.AsyncIterator[task_pb2.TaskOutput]:
        """The task's n choices, tokenized once (or not at all: the gateway's ids) and merged into one stream of
        outputs by choice index; the last output (finished) is the one that ends the last choice."""
        engine = typing.cast(GenerationEngine, model.engine)
        gen = task.generate
        field = "messages" if gen.messages else "prompt"
        if gen.prompt_token_ids:
            prompt_ids = list(gen.prompt_token_ids)  # the engine checks them against its vocabulary
        elif gen.messages:
            messages = [message_from_pb(m) for m in gen.messages]
            prompt_ids = await asyncio.to_thread(functools.partial(
                engine.apply_chat_template, messages, add_generation_prompt=not gen.omit_generation_prompt,
                continue_final_message=gen.continue_final_message, tools=[spec_from_pb(t) for t in gen.tools]))
        else:
            prompt_ids = await asyncio.to_thread(engine.encode, gen.prompt)
        num_prompt, context, s = len(prompt_ids), model.context_length, gen.sampling
        num_choices = max(1, gen.n)
        if num_choices > model.max_num_seqs:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"n={num_choices} is more sequences than model {model.version.version!r} runs at once "
                               f"on a worker ({model.max_num_seqs}): lower n")
        max_tokens = s.max_tokens
        if (s.logprobs or s.prompt_logprobs) and not getattr(engine, "supports_logprobs", False):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {model.version.version!r} runs on the {model.version.engine or 'torch'} "
                               "engine, which does not return logprobs: send the request without logprobs (and "
                               "without echo with logprobs), or use a version served by the torch engine")
        check_sampling(s, getattr(engine, "vocab_size", None))
        asks_penalties = bool(s.presence_penalty or s.frequency_penalty or s.repetition_penalty not in (0.0, 1.0)
                              or s.logit_bias or s.min_tokens or s.stop_token_ids)
        if asks_penalties and not getattr(engine, "supports_penalties", False):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {model.version.version!r} runs on the {model.version.engine or 'torch'} "
                               "engine, which does not apply presence_penalty, frequency_penalty, "
                               "repetition_penalty, logit_bias, min_tokens or stop_token_ids: send the request "
                               "without them, or use a version served by the torch engine")
        compiled = None
        constraint = Constraint.from_pb(s.structured) if s.HasField("structured") else None
        if constraint is not None:
            if not getattr(engine, "supports_structured", False):
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"model {model.version.version!r} runs on the {model.version.engine or 'torch'} "
                                   "engine, which does not constrain decoding: send the request without "
                                   "response_format json_object/json_schema and structured_outputs, or use a "
                                   "version served by the torch engine")
            try:
                compiled = await asyncio.to_thread(engine.compile_constraint, constraint)  # type: ignore[attr-defined]
            except ConstraintError as exc:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if max_tokens < 1 and not s.prompt_logprobs:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"max_tokens={max_tokens} generates nothing: it must be >= 1 (0 only to score the "
                               "prompt, with echo and logprobs)")
        if num_prompt == 0:  # tokenizers drop some characters (SmolLM2's: U+0004, U+0006, U+0013, ...)
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{field} has no tokens for model {model.version.version!r}: its tokenizer keeps none "
                               f"of its characters (control characters, for example); send text")
        if num_prompt >= context:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{field} is {num_prompt} tokens, but model {model.version.version!r} has a context "
                               f"length of {context} tokens: shorten the {field}")
        if num_prompt + max_tokens > context:
            if not s.max_tokens_is_default:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{field} ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                   f"length of {context} tokens of model {model.version.version!r}: set max_tokens "
                                   f"to at most {context - num_prompt} or shorten the {field}")
            max_tokens = context - num_prompt
        labels = (model.version.version,)
        metrics.PROMPT_TOKENS.labels(*labels).inc(num_prompt)

        # A migrated stream: each choice's state (choice 0's in resume when n is 1); finished choices do not run.
        resumes = list(gen.resume_choices) if num_choices > 1 else [gen.resume]
        if len(resumes) not in (0, num_choices):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"task.generate.resume_choices has {len(resumes)} entries for n={num_choices}")
        resumes += [task_pb2.ResumeState()] * (num_choices - len(resumes))
        if any(r.token_ids for r in resumes) and not getattr(engine, "supports_resume", False):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"this worker cannot resume a migrated stream of model {model.version.version!r} "
                               "(an engine without resume)")
        pending = [j for j in range(num_choices) if not resumes[j].finished]

        def request(j: int) -> GenerationRequest:
            request_id = task.request_id if num_choices == 1 else f"{task.request_id}#{j}"
            return GenerationRequest(request_id, prompt_ids, sampling_from_pb(s, max_tokens, choice=j,
                                                                              structured=compiled),
                                     priority=priority.from_pb(task.priority), cache_salt=task.cache_salt,
                                     adapter=model.adapter, resume_token_ids=list(resumes[j].token_ids),
                                     resume_text_length=resumes[j].text_length)

        outputs: asyncio.Queue[tuple[int, GenerationOutput] | BaseException] = asyncio.Queue()
        prefilled = asyncio.Event()

        async def run_choice(j: int) -> None:
            try:
                async for out in engine.generate(request(j)):
                    prefilled.set()
                    outputs.put_nowait((j, out))
            except BaseException as exc:  # handed to the merging loop, which re-raises it
                outputs.put_nowait(exc)
                raise

        choices: list[asyncio.Task] = []

        async def start_choices() -> None:
            first = asyncio.create_task(run_choice(pending[0]))
            choices.append(first)
            if len(pending) > 1:
                # The other choices start once the first has prefilled, so that an engine with a prefix cache
                # computes the prompt once and the others read its cached blocks.
                if getattr(engine, "caches_prefixes", False):
                    waiter = asyncio.create_task(prefilled.wait())
                    await asyncio.wait([first, waiter], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                choices.extend(asyncio.create_task(run_choice(j)) for j in pending[1:])

        if not pending:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "every choice of the resumed task had finished")
        starter = asyncio.create_task(start_choices())
        running = len(pending)
        try:
            while running:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue  # a choice cancelled below, on our own failure path
                    raise item
                j, out = item
                if out.finish_reason == "error":
                    raise ServiceError(grpc.StatusCode.INTERNAL, f"generation failed: {out.error}")
                if out.finish_reason == "abort":
                    return
                if out.finished:
                    running -= 1
                    metrics.COMPLETION_TOKENS.labels(*labels).inc(out.completion_tokens)
                yield task_pb2.TaskOutput(request_id=task.request_id, index=j, text_delta=out.text_delta,
                                          prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                          cached_tokens=out.cached_tokens, finished=out.finished and not running,
                                          finish_reason=(out.finish_reason or "") if out.finished else "",
                                          logprobs=logprobs_to_pb(out.logprobs),
                                          prompt_logprobs=logprobs_to_pb(out.prompt_logprobs or []),
                                          token_ids=out.token_ids)
        finally:
            starter.cancel()
            for choice in choices:
                choice.cancel()  # leaving early aborts the engine's sequences

    async def _embed(self, model: ServedModel, task: task_pb2.Task) -> task_pb2.TaskOutput:
        engine = typing.cast(EmbeddingEngine, model.engine)
        texts: list[str | list[int]]
        if task.embed.token_ids:
            token_ids = [list(entry.token_ids) for entry in task.embed.token_ids]
            texts, lengths = list(token_ids), [len(ids) for ids in token_ids]
            vocab = getattr(engine, "vocab_size", None)
            for i, ids in enumerate(token_ids):
                bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
                if bad is not None:
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"input[{i}] has the token id {bad}, outside the vocabulary of model "
                                       f"{model.version.version!r}")
        else:
            plain = list(task.embed.texts)
            texts, lengths = list(plain), await asyncio.to_thread(engine.count_tokens, plain)
        for i, n in enumerate(lengths):
            if n > model.context_length:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input[{i}] is {n} tokens, but model {model.version.version!r} accepts at most "
                                   f"{model.context_length}: shorten or split it")
        vectors, num_tokens = await engine.embed(texts)
        metrics.PROMPT_TOKENS.labels(model.version.version).inc(num_tokens)
        return task_pb2.TaskOutput(request_id=task.request_id, finished=True, prompt_tokens=num_tokens,
                                   finish_reason="stop", embeddings=[task_pb2.Vector(values=v) for v in vectors])


MAX_KEYS_PER_MESSAGE = 4096  # block keys per KvEvents message (32 bytes each): a snapshot goes in several


class _KvPublisher:
    """The prefix-cache events of this worker's engines onto one Serve stream (KV-aware routing): a snapshot when
    the stream opens, then each engine step's changes. The outbox is bounded: events that do not fit are dropped
    and the engine is asked for a new snapshot, so the scheduler's index is never silently wrong for long."""

    def __init__(self, models: dict[str, ServedModel], outbox: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.outbox, self.loop = outbox, loop
        self._unsubscribe: dict[str, typing.Callable[[], None]] = {}
        self._engines: dict[str, typing.Any] = {}
        for version, model in models.items():
            subscribe = getattr(model.engine, "subscribe_kv_events", None)
            if model.adapter or model.is_embedding or subscribe is None:
                continue  # an adapter's blocks are its base engine's (salted per adapter)
            self._engines[version] = model.engine
            self._subscribe(version)

    def _subscribe(self, version: str) -> None:
        def listener(reset: bool, stored: list[bytes], removed: list[bytes], block_size: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the stream is gone
                self.loop.call_soon_threadsafe(self._put, version, reset, stored, removed, block_size)
        self._unsubscribe[version] = self._engines[version].subscribe_kv_events(listener)

    def _put(self, version: str, reset: bool, stored: list[bytes], removed: list[bytes], block_size: int) -> None:
        if version not in self._unsubscribe:
            return
        messages = []
        for i in range(0, max(1, len(stored)), MAX_KEYS_PER_MESSAGE):
            messages.append(worker_pb2.KvEvents(model_version=version, reset=reset and i == 0, block_size=block_size,
                                                stored=stored[i:i + MAX_KEYS_PER_MESSAGE]))
        for i in range(0, len(removed), MAX_KEYS_PER_MESSAGE):
            messages.append(worker_pb2.KvEvents(model_version=version, block_size=block_size,
                                                removed=removed[i:i + MAX_KEYS_PER_MESSAGE]))
        # Events take at most half of the outbox, leaving room for outputs; beyond, they are dropped and a fresh
        # snapshot is asked for.
        if self.outbox.qsize() + len(messages) > self.outbox.maxsize // 2:
            log.warning("KV events dropped on a full stream; asking the engine for a snapshot", model_version=version)
            self._unsubscribe.pop(version)()
            self._subscribe(version)
            return
        for message in messages:
            self.outbox.put_nowait(worker_pb2.ServeResponse(kv_events=message))

    def close(self) -> None:
        for unsubscribe in self._unsubscribe.values():
            unsubscribe()
        self._unsubscribe.clear()


def worker_service_name() -> str:
    return worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
