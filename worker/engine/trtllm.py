"""The TensorRT-LLM backend: drives `tensorrt_llm.LLM` (its documented LLM API) as a contract.GenerationEngine,
so the worker does not know which engine it runs.

tensorrt-llm has no wheel for these machines (`pip install .[tensorrt]` where NVIDIA's index is reachable); it is
imported lazily, only for registry versions with engine=tensorrt_llm. UNTESTED ON REAL HARDWARE HERE: the adapter
is tested against a test double of the LLM API (tests/worker/tensorrt_llm_double.py).

LLM API used: LLM(model=<HF folder or engine dir>, max_batch_size=...), llm.generate_async(prompt_token_ids,
sampling_params, streaming=True) -> a result that is async-iterable (cumulative `outputs[0].text`,
`outputs[0].token_ids`, `outputs[0].finish_reason`, `finished`) and has `abort()`; SamplingParams(max_tokens,
temperature, top_p, top_k, seed, stop, ignore_eos).
"""

from __future__ import annotations

import importlib
import typing

from llmserve.common.tokenizers import prompt_ids
from llmserve.common.tools import ToolSpec, chat_ids

from .contract import EngineLoad, EngineStats, GenerationOutput, GenerationRequest
from .detokenizer import StopMatcher

MISSING = ("model version {version!r} needs the tensorrt_llm engine, but the tensorrt-llm package is not installed: "
           "install it on a GPU machine with `pip install .[tensorrt]` (from NVIDIA's package index), or register "
           "the model with engine=torch")


def import_tensorrt_llm(version: str = ""):
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as exc:
        raise RuntimeError(MISSING.format(version=version)) from exc


class TensorRTLLMEngine:
    def __init__(self, llm, tokenizer, *, max_num_seqs: int = 64, context_length: int = 4096, trtllm=None):
        self.llm, self.tokenizer = llm, tokenizer
        self.max_num_seqs = max_num_seqs
        self._context_length = context_length
        self._trtllm = trtllm or import_tensorrt_llm()
        self._running: dict[str, typing.Any] = {}  # request id -> the LLM API's streaming result

    @classmethod
    def from_pretrained(cls, version: str, model_path: str, *, max_num_seqs: int, context_length: int
                        ) -> TensorRTLLMEngine:
        trtllm = import_tensorrt_llm(version)
        from transformers import AutoTokenizer
        llm = trtllm.LLM(model=model_path, max_batch_size=max_num_seqs)
        return cls(llm, AutoTokenizer.from_pretrained(model_path), max_num_seqs=max_num_seqs,
                   context_length=context_length, trtllm=trtllm)

    # ---- contract.GenerationEngine ----

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: typing.Sequence[ToolSpec] = ()) -> list[int]:
        return chat_ids(self.tokenizer, messages, tools, add_generation_prompt=add_generation_prompt,
                        continue_final_message=continue_final_message)

    def load(self) -> EngineLoad:
        return EngineLoad(len(self._running), 0, self.max_num_seqs)

    def stats(self) -> EngineStats:
        """TensorRT-LLM keeps its KV cache to itself; only the request counts are known here."""
        return EngineStats(num_running=len(self._running))

    def start(self) -> None:
        """TensorRT-LLM runs its own executor loop; nothing to start."""

    async def stop(self) -> None:
        for result in list(self._running.values()):
            result.abort()
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def abort(self, request_id: str) -> None:
        result = self._running.get(request_id)
        if result is not None:
            result.abort()

    def _sampling_params(self, request: GenerationRequest):
        p = request.params
        # Stop strings are matched here (StopMatcher holds back partial matches so stream == final text) and
        # also handed to TensorRT-LLM so that it stops computing at once.
        return self._trtllm.SamplingParams(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
            seed=p.seed, stop=list(p.stop) or None, ignore_eos=p.ignore_eos)

    supports_logprobs = False  # not wired to TensorRT-LLM's own logprobs: the worker refuses such requests
    # Not wired to TensorRT-LLM's guided decoding, penalties or logits processors: refused, never ignored.
    supports_structured = False
    supports_penalties = False

    async def generate(self, request: GenerationRequest) -> typing.AsyncIterator[GenerationOutput]:
        rid = request.request_id
        p = request.params
        if p.logprobs or p.prompt_logprobs or p.max_tokens < 1:
            yield GenerationOutput(rid, "", True, "error", error="the TensorRT-LLM engine does not return logprobs "
                                   "or score prompts (max_tokens 0); use a version served by the torch engine")
            return
        if p.structured is not None or p.changes_logits:
            yield GenerationOutput(rid, "", True, "error", error="the TensorRT-LLM engine does not constrain "
                                   "decoding (response_format, structured_outputs) or apply presence/frequency/"
                                   "repetition penalties, logit_bias, min_tokens or stop_token_ids; use a version "
                                   "served by the torch engine")
            return
        result = self.llm.generate_async(request.prompt_token_ids, sampling_params=self._sampling_params(request),
                                         streaming=True)
        self._running[rid] = result
        matcher = StopMatcher(list(request.params.stop))
        num_prompt = len(request.prompt_token_ids)
        seen = num_tokens = 0  # characters of the cumulative text fed to the matcher; tokens generated
        is_finished = False
        try:
            async for output in result:
                completion = output.outputs[0]
                text, stopped = matcher.feed(completion.text[seen:])
                seen = len(completion.text)
                num_tokens = len(completion.token_ids)
                if stopped or output.finished:
                    if not stopped:
                        text += matcher.flush()
                    reason = "stop" if stopped else (completion.finish_reason or "stop")
                    if reason not in ("stop", "length"):  # e.g. "cancelled" after abort()
                        reason = "abort"
                    is_finished = True
                    yield GenerationOutput(rid, text, True, reason, num_prompt, num_tokens)
                    return
                if text:
                    yield GenerationOutput(rid, text, False, None, num_prompt, num_tokens)
            is_finished = True  # the stream ended without a final output: it was aborted
            yield GenerationOutput(rid, "", True, "abort", num_prompt, num_tokens)
        finally:
            self._running.pop(rid, None)
            if not is_finished:
                result.abort()  # the consumer left (cancelled, or the stream ended early): free the sequence
