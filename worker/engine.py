"""Model execution for the worker: a batching text-generation engine and a batching embedding engine.

TextGenerationEngine keeps one running batch in a transformers DynamicCache. Each step of its background thread
is schedule -> execute -> update:
  schedule  apply aborts, admit waiting requests (priority first) into free slots;
  execute   prefill the admitted prompts as one left-padded batch and merge their cache into the running one,
            then run one decode forward for every running row;
  update    sample a token per row, detokenize, check stop conditions, hand outputs to the asyncio side and
            drop finished rows from the batch and the cache, so compute shrinks as requests end.
A later engine replaces the contiguous cache with paged KV blocks; this one favours being obviously correct.
Torch releases the GIL, so the asyncio loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .detokenizer import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => disabled
    seed: int | None = None  # reproducible sampling per request (own torch.Generator)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 2  # 1 interactive, 2 standard, 3 batch (lower number joins a batch first)


@dataclass
class GenerationOutput:
    """One per engine step that produced text for the request, and a final one (finished=True)."""

    request_id: str
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    error: str | None = None  # set with finish_reason "error": what went wrong, for the caller's status message


@dataclass
class EngineLoad:
    num_running: int
    num_waiting: int
    max_num_seqs: int


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


class _Sequence:
    """Engine-side state of one admitted request."""

    def __init__(self, request: GenerationRequest, stream: _Stream, tokenizer):
        self.request, self.stream, self.params = request, stream, request.params
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated = 0
        self.last_token = -1
        self.is_finished = False
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.stop_matcher = StopMatcher(request.params.stop)
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    def append(self, token: int, eos_token_ids: set[int], context_length: int) -> None:
        """Account for one sampled token and emit what the client should see."""
        self.num_generated += 1
        self.last_token = token
        is_eos = token in eos_token_ids and not self.params.ignore_eos
        text, stopped = self.stop_matcher.feed("" if is_eos else self.detokenizer.add(token))
        reason = "stop" if stopped or is_eos else None
        if reason is None and (self.num_generated >= self.params.max_tokens or self.num_tokens >= context_length):
            reason = "length"
        if reason is not None and not stopped:
            # Release what the detokenizer and the stop matcher held back; it may still complete a stop string.
            tail, stopped = self.stop_matcher.feed(self.detokenizer.flush())
            text += tail if stopped else tail + self.stop_matcher.flush()
            reason = "stop" if stopped else reason
        if reason is not None:
            self.finish(reason, text)
        elif text:
            self.emit(text)

    def emit(self, text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        self.stream.put(GenerationOutput(
            self.request.request_id, text, finish_reason is not None, finish_reason,
            self.num_prompt_tokens, self.num_generated, error,
        ))

    def finish(self, reason: str, text: str = "", error: str | None = None) -> None:
        if not self.is_finished:
            self.is_finished = True
            self.emit(text, reason, error)


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature, top-k, then top-p sampling of one row of logits [vocab]."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` (a negative dim) up to `length`."""
    pad = [0, 0] * (-dim - 1) + [length - x.shape[dim], 0]
    return F.pad(x, pad)


class TextGenerationEngine:
    def __init__(self, model, tokenizer, *, max_num_seqs: int = 16, max_wait_ms: float = 5.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_wait_s = max_wait_ms / 1000
        if any(DynamicCache(config=model.config).is_sliding):
            # _merge and _drop_finished pad and trim every layer's keys along one shared time axis.
            raise ValueError("TextGenerationEngine supports full-attention models only, not sliding-window layers")
        self.device = next(model.parameters()).device
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.num_steps = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, GenerationRequest, _Stream]] = []  # heap of (priority, arrival, ...)
        self._arrivals = itertools.count()
        self._aborted: set[str] = set()
        self._is_stopping = False
        self._thread: threading.Thread | None = None
        # State of the running batch, touched only by the step thread (load() just reads it).
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [num_running, cache_len]; 0 marks left padding

    # ---- API used from the asyncio side ----

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        ))

    def load(self) -> EngineLoad:
        # A row is finished (and its final output sent) a moment before the step thread drops it from the batch.
        num_running = sum(not seq.is_finished for seq in self._running + self._prefilling)
        return EngineLoad(num_running, len(self._waiting), self.max_num_seqs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmserve-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort every request and join the step thread."""
        with self._cond:
            self._is_stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborted.add(request_id)
            self._cond.notify()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        stream = _Stream(asyncio.get_running_loop())
        with self._cond:
            if self._is_stopping:
                raise RuntimeError("the generation engine is stopped")
            heapq.heappush(self._waiting, (request.priority, next(self._arrivals), request, stream))
            self._cond.notify()
        is_finished = False
        try:
            while not is_finished:
                output = await stream.queue.get()
                is_finished = output.finished
                yield output
        finally:
            if not is_finished:  # consumer left early (aclose, cancellation): free the sequence
                self.abort(request.request_id)

    # ---- step thread ----

    def _run(self) -> None:
        while (scheduled := self._schedule()) is not None:
            admitted, aborted = scheduled
            try:
                with torch.inference_mode():
                    self._abort_running(aborted)
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._decode()
            except Exception as exc:  # the shared cache is suspect now: fail the batch, start clean, go on
                log.exception("engine step failed")
                for seq in self._running + self._prefilling:
                    seq.finish("error", error=f"{type(exc).__name__}: {exc}")
                self._running, self._prefilling, self._cache, self._mask = [], [], None, None
            self.num_steps += 1
        with self._cond:
            waiting, self._waiting = self._waiting, []
        for seq in self._running + [_Sequence(r, s, self.tokenizer) for _, _, r, s in waiting]:
            seq.finish("abort")
        self._running, self._cache, self._mask = [], None, None

    def _schedule(self) -> tuple[list[_Sequence], set[str]] | None:
        """Pick waiting requests for the free slots, lowest priority number first; None means shut down.

        With nothing running, sleep until a request arrives and then gather for up to max_wait_s, so that a
        burst of requests shares one prefill.
        """
        with self._cond:
            if not self._running:
                while not (self._waiting or self._aborted or self._is_stopping):
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._waiting) < self.max_num_seqs and not self._is_stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._is_stopping:
                return None
            aborted, self._aborted = self._aborted, set()
            cancelled = [entry for entry in self._waiting if entry[2].request_id in aborted]
            if cancelled:
                self._waiting = [entry for entry in self._waiting if entry[2].request_id not in aborted]
                heapq.heapify(self._waiting)
            for _, _, request, stream in cancelled:  # after the removal, so load() never counts them
                _Sequence(request, stream, self.tokenizer).finish("abort")
            num_free = self.max_num_seqs - len(self._running)
            picked = [heapq.heappop(self._waiting) for _ in range(min(num_free, len(self._waiting)))]
            self._prefilling = [_Sequence(r, s, self.tokenizer) for _, _, r, s in picked]
            return self._prefilling, aborted

    def _abort_running(self, aborted: set[str]) -> None:
        for seq in self._running:
            if seq.request.request_id in aborted:
                seq.finish("abort")
        self._drop_finished()

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Run the admitted prompts as one left-padded batch, merge them into the running batch, sample."""
        for seq in seqs:
            if seq.num_prompt_tokens == 0:
                seq.finish("error", error="the prompt has no tokens")
        seqs = [seq for seq in seqs if not seq.is_finished]
        if not seqs:
            self._prefilling = []
            return
        max_len = max(seq.num_prompt_tokens for seq in seqs)
        input_ids = torch.full((len(seqs), max_len), self.pad_token_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), max_len), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(seqs):
            input_ids[row, max_len - seq.num_prompt_tokens :] = torch.tensor(seq.request.prompt_token_ids)
            mask[row, max_len - seq.num_prompt_tokens :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]; padding sits at 0, masked anyway
        input_ids, mask, position_ids = input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device)
        cache = DynamicCache(config=self.model.config)
        try:
            logits = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1]  # [B, vocab]
        except Exception as exc:  # e.g. a token id outside the vocabulary: fail the newcomers, keep the batch
            log.exception("prefill failed")
            for seq in seqs:
                seq.finish("error", error=f"{type(exc).__name__}: {exc}")
            self._prefilling = []
            return
        self._merge(seqs, cache, mask)
        self._prefilling = []
        self._update(seqs, logits)

    def _decode(self) -> None:
        """One forward for every running row, feeding each its last sampled token."""
        seqs = self._running
        input_ids = torch.tensor([[seq.last_token] for seq in seqs], device=self.device)  # [B, 1]
        position_ids = torch.tensor([[seq.num_tokens - 1] for seq in seqs], device=self.device)  # [B, 1]
        self._mask = F.pad(self._mask, (0, 1), value=1)  # [B, cache_len + 1]
        logits = self.model(
            input_ids=input_ids, attention_mask=self._mask, position_ids=position_ids,
            cache=self._cache, use_cache=True,
        ).logits[:, -1]  # [B, vocab]
        self._update(seqs, logits)

    def _update(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of logits [len(seqs), vocab], emit outputs, drop finished rows."""
        greedy = logits.argmax(-1).tolist()
        for row, seq in enumerate(seqs):
            try:
                params = seq.params
                if params.temperature <= 0:
                    token = greedy[row]
                else:  # sampled on the CPU, so that a seed gives the same text whatever the device
                    token = _sample_row(logits[row].cpu(), params, seq.generator)
                seq.append(token, self.eos_token_ids, self.context_length)
            except Exception as exc:  # e.g. invalid sampling parameters: only this request fails
                seq.finish("error", error=f"{type(exc).__name__}: {exc}")
        self._drop_finished()

    # ---- running batch and its cache ----

    def _merge(self, seqs: list[_Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever side is shorter."""
        if self._cache is None:
            self._running, self._cache, self._mask = list(seqs), cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            # keys/values: [B, num_kv_heads, cache_len, head_dim]
            old.keys = torch.cat([_left_pad(old.keys, length, -2), _left_pad(new.keys, length, -2)])
            old.values = torch.cat([_left_pad(old.values, length, -2), _left_pad(new.values, length, -2)])
        self._mask = torch.cat([_left_pad(self._mask, length, -1), _left_pad(mask, length, -1)])
        self._running.extend(seqs)

    def _drop_finished(self) -> None:
        keep = [row for row, seq in enumerate(self._running) if not seq.is_finished]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._running = [self._running[row] for row in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Columns that are padding for every remaining row cost attention time in every later step: cut them.
        num_dead = int(self._mask.any(0).long().argmax())
        if num_dead:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., num_dead:, :], layer.values[..., num_dead:, :]
            self._mask = self._mask[:, num_dead:]


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(i) for i in ids if i is not None}


class EmbeddingEngine:
    """Mean-pooled, L2-normalised sentence embeddings with dynamic batching across concurrent callers.

    Calls are gathered until max_batch_size texts or max_wait_ms after the first, then run as one padded
    batch in a worker thread; each caller gets its own rows back.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_length = max_length or min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self.device = next(model.parameters()).device
        self.num_batches = 0  # batches run so far; lets tests and metrics see that calls were batched
        self._queue: queue.Queue = queue.Queue()  # (texts, loop, future) or None to stop
        self._thread: threading.Thread | None = None

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmserve-embed", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Return (one unit vector per text, number of input tokens)."""
        if not texts:
            return [], 0
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((list(texts), loop, future))
        return await future

    def _run(self) -> None:
        is_stopping = False
        while not is_stopping:
            first = self._queue.get()
            if first is None:
                break
            calls, num_texts = [first], len(first[0])
            deadline = time.monotonic() + self.max_wait_s
            while num_texts < self.max_batch_size:
                try:
                    call = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if call is None:
                    is_stopping = True
                    break
                calls.append(call)
                num_texts += len(call[0])
            self._run_calls(calls)
        while not self._queue.empty():  # calls that arrived with the stop: fail them rather than hang
            call = self._queue.get()
            if call is not None:
                _resolve(call, exception=RuntimeError("the embedding engine is stopped"))

    def _run_calls(self, calls: list) -> None:
        texts = [text for call_texts, _, _ in calls for text in call_texts]
        try:
            vectors, token_counts = [], []
            for start in range(0, len(texts), self.max_batch_size):
                batch_vectors, batch_counts = self._embed_batch(texts[start : start + self.max_batch_size])
                vectors.extend(batch_vectors)
                token_counts.extend(batch_counts)
        except Exception as exc:
            log.exception("embedding batch failed")
            for call in calls:
                _resolve(call, exception=exc)
            return
        offset = 0
        for call in calls:
            num = len(call[0])
            _resolve(call, result=(vectors[offset : offset + num], sum(token_counts[offset : offset + num])))
            offset += num

    def _embed_batch(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state  # [B, T, hidden]
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, hidden]
            vectors = F.normalize(pooled.float(), dim=-1)  # [B, hidden]
        self.num_batches += 1
        return vectors.tolist(), encoded["attention_mask"].sum(1).tolist()


def _resolve(call, *, result=None, exception: BaseException | None = None) -> None:
    """Complete a caller's future from the worker thread (unless the caller was cancelled meanwhile)."""
    _, loop, future = call

    def complete() -> None:
        if future.done():
            return
        future.set_exception(exception) if exception is not None else future.set_result(result)

    try:
        loop.call_soon_threadsafe(complete)
    except RuntimeError:  # loop closed
        pass
