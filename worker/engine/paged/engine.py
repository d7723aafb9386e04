"""PagedEngine: continuous batching over a paged KV cache, with chunked prefill, prefix caching and preemption.

Implements contract.GenerationEngine. The worker's compute thread (compute.py) runs step() = schedule -> execute ->
update while the engine has work:
  schedule  the StepScheduler picks this step's sequences and token counts (step_scheduler.py);
  execute   the ModelRunner runs one forward over the paged cache; the sampler picks the caught-up rows' tokens;
  update    tokens are appended, detokenized and checked for stops; finished sequences free their blocks
            at once, outputs go to each caller's asyncio loop with call_soon_threadsafe.
New requests and aborts are taken in between steps, so a request joins the running batch (or leaves it, its
blocks freed) within one step. Torch releases the GIL, so the asyncio side stays responsive meanwhile.
All torch work of a process runs on that one thread: a second thread calling torch gets an OpenMP team of its own
and slows the first severalfold on a few cores (compute.py has the figures).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import pathlib
import typing
from collections.abc import AsyncIterator

import torch

from llmserve.common.structured import CompiledGrammar, Constraint, GrammarCompiler
from llmserve.common.tokenizers import prompt_ids
from llmserve.common.tools import ToolSpec, chat_ids

from ..compute import ComputeThread, compute_thread
from ..contract import EngineLoad, EngineStats, GenerationOutput, GenerationRequest, TokenLogprob, eos_token_ids
from ..detokenizer import IncrementalDetokenizer, StopMatcher
from ..logprobs import TokenBytes, token_logprobs
from . import lora
from .block_manager import BlockManager, num_blocks_for_memory
from .model_runner import ModelRunner
from .sampler import row_processing, sample, skip_draws
from .sequence import Sequence, SequenceStatus
from .step_scheduler import StepScheduler

log = logging.getLogger(__name__)

# (reset, stored keys, removed keys, block size), called on the compute thread (PagedEngine.subscribe_kv_events)
KvListener = typing.Callable[[bool, list[bytes], list[bytes], int], None]


class _Stream:
    """Hands outputs from the step thread to the consumer's asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()

    def put(self, output: GenerationOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class PagedEngine:
    def __init__(self, model, tokenizer, *, max_num_seqs: int = 16, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_fraction: float = 0.1,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 quantization: str = "", compute: ComputeThread | None = None, max_adapters: int = 8,
                 max_lora_rank: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs = max_num_seqs
        self._compute = compute or compute_thread()
        config = model.config
        param = next(model.parameters())
        self.device = param.device
        max_model_len = int(config.max_position_embeddings)
        if num_kv_blocks is None:
            num_kv_blocks = num_blocks_for_memory(
                config, block_size, param.dtype, self.device, kv_cache_fraction,
                max_num_blocks=max_num_seqs * -(-max_model_len // block_size),
            )
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = StepScheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens)
        # Built on the compute thread: packing the weights and filling the cache are the first parallel torch ops.
        self.runner = self._compute.submit(
            lambda: ModelRunner(model, num_blocks=num_kv_blocks, block_size=block_size,
                                quantization=quantization)).result()
        self._context_length = min(max_model_len, num_kv_blocks * block_size)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = int(config.vocab_size)
        self.token_bytes = TokenBytes(tokenizer)
        self._grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self._grammars.warm()  # now, not at the first constrained request: building it stalls the process ~1 s
        self.num_steps = 0
        self._cond = self._compute.cond  # guards the inbox, the aborts and the stop flag
        self._inbox: list[Sequence] = []
        self._aborted: set[str] = set()
        self._is_stopping = False
        self._stopped: concurrent.futures.Future[None] | None = None  # set by start(); done once stopped
        self._seqs: dict[str, Sequence] = {}  # admitted, not finished; touched by the step thread only
        # KV-cache events for routing (subscribe_kv_events), guarded by _cond: listeners that have had their
        # snapshot, and new ones waiting for it.
        self._kv_listeners: list[KvListener] = []
        self._kv_new_listeners: list[KvListener] = []
        # LoRA adapters (asyncio side): known sources, the resident ones in LRU order, and who uses them.
        self.max_adapters, self.max_lora_rank = max_adapters, max_lora_rank
        self._adapter_sources: dict[str, pathlib.Path] = {}
        self._adapters: collections.OrderedDict[str, lora.Adapter] = collections.OrderedDict()
        self._adapter_users: collections.Counter[str] = collections.Counter()
        self._adapter_loads: dict[str, asyncio.Future[lora.Adapter]] = {}
        self._adapter_freed: asyncio.Event | None = None
        self.num_adapter_loads = 0

    # ---- API used from the asyncio side ----

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: typing.Sequence[ToolSpec] = ()) -> list[int]:
        return chat_ids(self.tokenizer, messages, tools, add_generation_prompt=add_generation_prompt,
                        continue_final_message=continue_final_message)

    supports_logprobs = True  # generated and prompt tokens' (SamplingParams.logprobs, prompt_logprobs)
    supports_penalties = True  # penalties, logit_bias, min_tokens, stop_token_ids (applied per row in the sampler)
    supports_structured = True  # SamplingParams.structured (compile_constraint)

    def compile_constraint(self, constraint: Constraint) -> CompiledGrammar:
        """The constraint compiled for this engine's vocabulary (cached; ConstraintError if it cannot compile).
        Blocking (up to seconds the first time, when the grammar engine's tokenizer is built): call it off the
        event loop."""
        return self._grammars.compile(constraint)

    @property
    def caches_prefixes(self) -> bool:
        """Whether a prompt's computed blocks serve later sequences with the same prefix (the worker starts the
        other choices of an n > 1 task after the first has prefilled, so the prompt is computed once)."""
        return self.block_manager.enable_prefix_caching

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.scheduler.running), len(self.scheduler.waiting) + len(self._inbox),
                          self.max_num_seqs)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_steps=self.num_steps, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks, num_cached_kv_blocks=bm.num_cached_blocks,
            block_size=bm.block_size, num_prefix_hit_tokens=bm.num_prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )

    supports_resume = True  # GenerationRequest.resume_token_ids (migrated streams)

    def subscribe_kv_events(self, listener: KvListener) -> typing.Callable[[], None]:
        """listener(reset, stored, removed, block_size) is called on the compute thread, first with a snapshot
        (reset True, every cached block key), then after each engine step that changed the prefix cache with the
        keys stored and evicted (netted over the step), and with a new snapshot if events had to be dropped.
        Returns the function that unsubscribes it."""
        with self._cond:
            self._kv_new_listeners.append(listener)
            self._cond.notify()

        def unsubscribe() -> None:
            with self._cond:
                for listeners in (self._kv_listeners, self._kv_new_listeners):
                    if listener in listeners:
                        listeners.remove(listener)
        return unsubscribe

    def _publish_kv_events(self) -> None:
        """Compute thread: this step's prefix-cache changes to the listeners, snapshots to new ones."""
        bm = self.block_manager
        with self._cond:
            new, self._kv_new_listeners = self._kv_new_listeners, []
            self._kv_listeners.extend(new)
            active = [listener for listener in self._kv_listeners if listener not in new]
        if not active and not new:
            bm.kv_events = None  # nobody listens: record nothing
            return
        if bm.kv_events is None:
            bm.kv_events = []
        stored, removed, lost = bm.drain_kv_events()
        for listener in active:
            try:
                if lost:
                    listener(True, list(bm.hash_to_block), [], bm.block_size)
                elif stored or removed:
                    listener(False, stored, removed, bm.block_size)
            except Exception:
                log.exception("a KV event listener failed")
        for listener in new:
            try:
                listener(True, list(bm.hash_to_block), [], bm.block_size)
            except Exception:
                log.exception("a KV event listener failed")

    def start(self) -> None:
        self._stopped = concurrent.futures.Future()
        self._compute.add_loop(self)

    async def stop(self) -> None:
        """Abort every request and wait until the compute thread has let go of the engine."""
        with self._cond:
            self._is_stopping = True
            self._cond.notify()
        if self._stopped is not None:
            await asyncio.wrap_future(self._stopped)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborted.add(request_id)
            self._cond.notify()

    # ---- LoRA adapters ----

    def add_adapter(self, name: str, path: pathlib.Path) -> None:
        """Makes an adapter known by name; it loads on first use (or with load_adapter), and later again if the
        LRU cap (max_adapters resident) evicted it meanwhile."""
        self._adapter_sources[name] = pathlib.Path(path)

    def remove_adapter(self, name: str) -> None:
        """Forgets an adapter: new requests for it fail; running ones finish, then its weights are freed."""
        self._adapter_sources.pop(name, None)
        if not self._adapter_users[name]:
            self._adapters.pop(name, None)

    @property
    def resident_adapters(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, name: str) -> lora.Adapter:
        """The resident adapter, loading it (on the compute thread) if needed; AdapterError if it cannot apply."""
        adapter = await self._acquire_adapter(name)
        self._release_adapter(name)
        return adapter

    async def _acquire_adapter(self, name: str) -> lora.Adapter:
        if self._adapter_freed is None:
            self._adapter_freed = asyncio.Event()
        while True:
            if name not in self._adapter_sources:
                raise lora.AdapterError(f"adapter {name!r} is not served by this engine")
            if name in self._adapters:
                self._adapters.move_to_end(name)
                self._adapter_users[name] += 1
                return self._adapters[name]
            loading = self._adapter_loads.get(name)
            if loading is not None:
                await asyncio.shield(loading)
                continue
            if len(self._adapters) + len(self._adapter_loads) >= self.max_adapters:
                idle = [n for n in self._adapters if not self._adapter_users[n]]
                if not idle:  # every resident adapter runs requests: wait for one to finish
                    self._adapter_freed.clear()
                    await self._adapter_freed.wait()
                    continue
                del self._adapters[idle[0]]  # the least recently used idle one
            path = self._adapter_sources[name]
            future = asyncio.wrap_future(self._compute.submit(functools.partial(
                lora.load_adapter, name, path, self.model.config, dtype=self.runner.dtype,
                device=self.runner.device, max_rank=self.max_lora_rank)))
            self._adapter_loads[name] = future
            try:
                adapter = await asyncio.shield(future)
            finally:
                self._adapter_loads.pop(name, None)
            self.num_adapter_loads += 1
            if name in self._adapter_sources:
                self._adapters[name] = adapter

    def _release_adapter(self, name: str) -> None:
        self._adapter_users[name] -= 1
        if not self._adapter_users[name]:
            del self._adapter_users[name]
            if name not in self._adapter_sources:  # removed while in use
                self._adapters.pop(name, None)
            if self._adapter_freed is not None:
                self._adapter_freed.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not request.adapter:
            async for output in self._generate(request, None):
                yield output
            return
        try:
            adapter = await self._acquire_adapter(request.adapter)
        except lora.AdapterError as exc:
            yield GenerationOutput(request.request_id, "", True, "error", error=str(exc))
            return
        try:
            async for output in self._generate(request, adapter):
                yield output
        finally:
            self._release_adapter(request.adapter)

    async def _generate(self, request: GenerationRequest, adapter: lora.Adapter | None
                        ) -> AsyncIterator[GenerationOutput]:
        # Cached KV depends on the adapter too: blocks are shared only between requests of the same adapter.
        salt = request.cache_salt if adapter is None else f"{request.cache_salt}\x00lora:{adapter.name}"
        seq = Sequence(request.prompt_token_ids, request.params, request_id=request.request_id,
                       priority=request.priority, cache_salt=salt, adapter=adapter)
        seq.stream = _Stream(asyncio.get_running_loop())
        seq.resume_token_ids, seq.resume_text_length = list(request.resume_token_ids), request.resume_text_length
        with self._cond:
            if self._is_stopping:
                raise RuntimeError("the generation engine is stopped")
            self._inbox.append(seq)
            self._cond.notify()
        is_finished = False
        try:
            while not is_finished:
                output = await seq.stream.queue.get()
                is_finished = output.finished
                yield output
        finally:
            if not is_finished:  # consumer left early (aclose, cancellation): free the sequence
                self.abort(request.request_id)

    # ---- compute thread ----

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborted or self._is_stopping or self.scheduler.running
                    or self.scheduler.waiting or self._kv_new_listeners)

    def run_once(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborted, self._aborted = self._aborted, set()
            is_stopping = self._is_stopping
        if is_stopping:
            for seq in list(self._seqs.values()) + inbox:
                self._finish(seq, "abort")
            self._compute.remove_loop(self)
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            return
        for seq in inbox:
            self._admit(seq)
        for request_id in aborted:
            if (gone := self._seqs.get(request_id)) is not None:
                self._finish(gone, "abort")
        try:
            self.step()
        except Exception:  # fail what ran; the block manager stays consistent, so go on
            log.exception("engine step failed")
            for seq in list(self.scheduler.running):
                self._fail(seq, "the engine step computing this request failed")
        self._publish_kv_events()

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return
        with torch.inference_mode():
            result = self.runner.run(batch)
            self.scheduler.update(batch)
            seqs = [batch.seqs[i] for i in result.sampled]
            tokens = sample(seqs, result.logits)
            self._record_prompt_logprobs(batch, result.prompt_logits)
            self._record_logprobs(seqs, tokens, result.logits)
        for seq, token in zip(seqs, tokens):
            if seq.params is not None and seq.params.max_tokens == 0 and not seq.is_finished:
                self._finish(seq, "length")  # scoring only (echo with prompt logprobs): nothing is generated
                continue
            if token is None and seq.dead_end:
                self._end_dead(seq)
                continue
            if token is None:  # the model's scores for this row were NaN: only this request fails
                self._fail(seq, "the model produced no valid scores for this request")
                continue
            try:
                self._append(seq, token)
            except Exception:  # e.g. a tokenizer failure: only this request fails
                log.exception("decoding a sampled token failed")
                self._fail(seq, "decoding the generated text failed")
        self.num_steps += 1

    def _record_prompt_logprobs(self, batch, prompt_logits) -> None:
        """Entries of the prompt tokens whose logits this step computed: row r of a chunk starting at position p
        scores the prompt token at p + r + 1. A chunk computed again (after a preemption) adds nothing twice."""
        for part in prompt_logits:
            seq = batch.seqs[part.index]
            entries = seq.prompt_logprobs
            if entries is None or seq.is_finished:
                continue
            first = len(entries) - part.start - 1  # the first row that scores a token not yet recorded
            last = min(part.logits.shape[0], seq.num_prompt_tokens - part.start - 1)
            if first < 0 or first >= last:
                continue
            targets = seq.token_ids[part.start + first + 1:part.start + last + 1]
            entries.extend(token_logprobs(part.logits[first:last], targets, seq.params.top_logprobs,
                                          self.token_bytes))

    def _record_logprobs(self, seqs: list[Sequence], tokens: list[int | None], logits: torch.Tensor) -> None:
        """Entries of the tokens just sampled, for the sequences that ask (one log-softmax over their rows only)."""
        rows = [i for i, (seq, token) in enumerate(zip(seqs, tokens))
                if token is not None and seq.params is not None and seq.params.logprobs and seq.params.max_tokens]
        if not rows:
            return
        by_top: dict[int, list[int]] = {}
        for i in rows:
            by_top.setdefault(seqs[i].params.top_logprobs, []).append(i)
        for num_top, group in by_top.items():
            entries = token_logprobs(logits[group], [typing.cast(int, tokens[i]) for i in group], num_top,
                                     self.token_bytes)
            for i, entry in zip(group, entries):
                seqs[i].pending_logprobs.append(entry)

    def _admit(self, seq: Sequence) -> None:
        error = None
        if seq.num_prompt_tokens == 0:
            error = "the prompt has no tokens"
        elif not all(0 <= t < self.vocab_size for t in seq.token_ids):
            error = f"the prompt has token ids outside the vocabulary of {self.vocab_size}"
        elif seq.params is not None and not all(0 <= t < self.vocab_size for t in
                                                [*seq.params.logit_bias, *seq.params.stop_token_ids]):
            error = f"logit_bias or stop_token_ids name token ids outside the vocabulary of {self.vocab_size}"
        elif seq.num_prompt_tokens >= self.context_length:
            error = f"the prompt has {seq.num_prompt_tokens} tokens; the context length is {self.context_length}"
        if seq.request_id in self._seqs:
            error = f"request {seq.request_id!r} is already running"
        if error is not None:
            self._finish(seq, "error", error=error)
            return
        try:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
            seq.stop_matcher = StopMatcher(seq.params.stop)
            grammar = seq.params.structured
            seq.processing = row_processing(seq.params, self.eos_token_ids,
                                            grammar.matcher() if grammar is not None else None)
            if seq.params.prompt_logprobs:  # the first prompt token has no logprob: nothing comes before it
                seq.prompt_logprobs = [TokenLogprob(seq.token_ids[0], None, self.token_bytes(seq.token_ids[0]))]
            if seq.resume_token_ids:
                self._resume(seq)
            self.scheduler.add(seq)
        except ValueError as exc:  # the scheduler's own message: the request cannot fit the KV cache
            self._finish(seq, "error", error=str(exc))
            return
        except Exception:
            log.exception("admitting a request failed")
            self._fail(seq, "the request could not be prepared for generation")
            return
        self._seqs[seq.request_id] = seq

    def _end_dead(self, seq: Sequence) -> None:
        """A grammar that allows no next token: the output is complete if the grammar accepts it ("stop"), else
        the sequence fails with the reason (its slot is freed like any other)."""
        matcher = seq.processing.matcher if seq.processing is not None else None
        if matcher is not None and matcher.is_accepting:
            tail, _ = seq.stop_matcher.feed(seq.detokenizer.flush())
            self._finish(seq, "stop", tail + seq.stop_matcher.flush())
            return
        why = (matcher.error if matcher is not None else "") or "no token continues it"
        self._fail(seq, f"the output constraint reached a dead end after {seq.num_completion_tokens} tokens: {why}")

    def _resume(self, seq: Sequence) -> None:
        """A stream migrated from a lost worker: its tokens become this sequence's generated tokens (their K/V is
        computed with the prompt's, like a preempted sequence's), replayed through the detokenizer, the stop
        matcher and a grammar's matcher, and the seeded generator skips their draws; text the client does not
        have yet is held for the next output."""
        resumed, seq.resume_token_ids = seq.resume_token_ids, []
        if not all(0 <= t < self.vocab_size for t in resumed):
            raise ValueError(f"the resumed tokens include ids outside the vocabulary of {self.vocab_size}")
        if seq.num_prompt_tokens + len(resumed) >= self.context_length:
            raise ValueError(f"the prompt and the {len(resumed)} resumed tokens fill the context length of "
                             f"{self.context_length}")
        matcher = getattr(getattr(seq, "processing", None), "matcher", None)
        text = ""
        for token in resumed:
            seq.append_token(token)
            if matcher is not None:
                matcher.accept(token)
            delta, _ = seq.stop_matcher.feed(seq.detokenizer.add(token))
            text += delta
        seq.num_tokens_sent = len(resumed)
        seq.held_text = text[seq.resume_text_length:]
        seq.prompt_logprobs = None  # the lost worker sent them with its first output
        skip_draws(seq, len(resumed), self.vocab_size)

    def _append(self, seq: Sequence, token: int) -> None:
        """Account for one sampled token and emit what the client should see."""
        params = seq.params
        seq.append_token(token)
        is_eos = ((token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids)
        matcher = seq.processing.matcher if seq.processing is not None else None
        if matcher is not None and not is_eos and not matcher.accept(token):
            seq.token_ids.pop()  # the mask allowed it, so only a grammar engine failure gets here
            self._end_dead(seq)
            return
        text, stopped = seq.stop_matcher.feed("" if is_eos else seq.detokenizer.add(token))
        reason = "stop" if stopped or is_eos else None
        if reason is None and matcher is not None and matcher.is_stopped:
            reason = "stop"  # the grammar is complete: only end-of-sequence could follow
        if reason is None and (seq.num_completion_tokens >= params.max_tokens
                               or seq.num_tokens >= self.context_length):
            reason = "length"
        if reason is not None and not stopped:
            # Release what the detokenizer and the stop matcher held back; it may still complete a stop string.
            tail, stopped = seq.stop_matcher.feed(seq.detokenizer.flush())
            text += tail if stopped else tail + seq.stop_matcher.flush()
            reason = "stop" if stopped else reason
        if reason is not None:
            self._finish(seq, reason, text)
        elif text or seq.pending_logprobs:
            self._emit(seq, text)

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        if seq.is_finished:
            return
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
            self.scheduler.finish(seq)  # frees its blocks now
        seq.status = SequenceStatus.FINISHED
        self._emit(seq, text, reason, error)

    def _fail(self, seq: Sequence, message: str) -> None:
        """End one request with an error whose text is safe to show its caller: no exception text of internals
        (that goes to the log, which never holds prompts)."""
        self._finish(seq, "error", error=message)

    def _emit(self, seq: Sequence, text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        if seq.held_text:
            text, seq.held_text = seq.held_text + text, ""
        token_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_tokens_sent:]
        seq.num_tokens_sent += len(token_ids)
        seq.stream.put(GenerationOutput(
            seq.request_id, text, finish_reason is not None, finish_reason, seq.num_prompt_tokens,
            seq.num_completion_tokens, error, seq.num_cached_tokens, logprobs, prompt_logprobs, token_ids,
        ))
