"""Embeddings with dynamic batching: concurrent calls are gathered until max_num_seqs texts or max_wait_ms,
then run as one padded batch (mean pooling over the attention mask, L2 norm); each caller gets its own rows."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import torch
import torch.nn.functional as F

from .compute import ComputeThread, compute_thread
from .contract import EngineLoad, EngineStats

log = logging.getLogger(__name__)


class TorchEmbeddingEngine:
    """Mean-pooled, L2-normalised sentence embeddings with dynamic batching across concurrent callers.

    Calls are gathered until max_num_seqs texts or max_wait_ms after the first (in a batching thread), then run as
    one padded batch on the worker's compute thread (compute.py), between generation steps; each caller gets its
    own rows back. Implements contract.EmbeddingEngine.
    """

    def __init__(self, model, tokenizer, *, max_num_seqs: int = 32, max_wait_ms: float = 5.0,
                 context_length: int | None = None, compute: ComputeThread | None = None):
        self.model, self.tokenizer = model, tokenizer
        self._compute = compute or compute_thread()
        self.max_num_seqs = max_num_seqs
        self.max_wait_s = max_wait_ms / 1000
        limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self._context_length = min(context_length or limit, limit)
        self.device = next(model.parameters()).device
        self.num_batches = 0  # batches run so far; lets tests and metrics see that calls were batched
        self._num_texts_inflight = 0  # texts handed to embed() and not answered yet (read from the event loop)
        self._queue: queue.Queue = queue.Queue()  # (texts, loop, future) or None to stop
        self._thread: threading.Thread | None = None

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, untruncated (so that callers can refuse texts longer than context_length)."""
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def load(self) -> EngineLoad:
        running = min(self._num_texts_inflight, self.max_num_seqs)
        return EngineLoad(running, self._num_texts_inflight - running, self.max_num_seqs)

    def stats(self) -> EngineStats:
        load = self.load()
        return EngineStats(num_steps=self.num_batches, num_running=load.num_running, num_waiting=load.num_waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmserve-embed", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Return (one unit vector per input, number of input tokens). An input is a text, or token ids embedded as
        given (no special tokens added; the caller has checked them against the vocabulary and the context)."""
        if not texts:
            return [], 0
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((list(texts), loop, future))
        self._num_texts_inflight += len(texts)
        try:
            return await future
        finally:
            self._num_texts_inflight -= len(texts)

    def _run(self) -> None:
        is_stopping = False
        while not is_stopping:
            first = self._queue.get()
            if first is None:
                break
            calls, num_texts = [first], len(first[0])
            deadline = time.monotonic() + self.max_wait_s
            while num_texts < self.max_num_seqs:
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
            for start in range(0, len(texts), self.max_num_seqs):
                batch = texts[start : start + self.max_num_seqs]
                batch_vectors, batch_counts = self._compute.submit(self._embed_batch, batch).result()
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

    def _embed_batch(self, texts: list[str | list[int]]) -> tuple[list[list[float]], list[int]]:
        if all(isinstance(t, str) for t in texts):
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                                     return_tensors="pt").to(self.device)
        else:  # token ids among the inputs: texts are encoded alone, then all are padded as one batch
            ids = [self.tokenizer(t, truncation=True, max_length=self.context_length)["input_ids"]
                   if isinstance(t, str) else list(t) for t in texts]
            encoded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
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
