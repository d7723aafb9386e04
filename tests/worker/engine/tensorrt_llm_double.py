"""TEST DOUBLE of tensorrt_llm's LLM API (LLM, SamplingParams, streaming results with abort), for testing the
adapter in llmserve/worker/engine/trtllm.py on machines without TensorRT-LLM. It is NOT TensorRT-LLM: it "generates"
by replaying a scripted text, token by token, with the real tokenizer, following the documented shapes:
cumulative outputs[0].text / token_ids, finish_reason, finished, abort()."""

from __future__ import annotations

import asyncio
import dataclasses


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class RequestOutput:
    outputs: list[CompletionOutput]
    finished: bool


class _Result:
    def __init__(self, llm: LLM, prompt_ids, params: SamplingParams):
        self.llm, self.params = llm, params
        self.prompt_ids = prompt_ids
        self.aborted = False
        llm.active.add(self)

    def abort(self) -> None:
        if self.aborted:
            return
        self.aborted = True
        self.llm.active.discard(self)
        self.llm.aborted += 1

    async def _stream(self):
        tokens = self.llm.tokenizer.encode(self.llm.script, add_special_tokens=False)
        out = CompletionOutput(index=0)
        try:
            for i, token in enumerate(tokens[: self.params.max_tokens]):
                await asyncio.sleep(self.llm.step_s)
                if self.aborted:
                    return
                out.token_ids.append(token)
                out.text = self.llm.tokenizer.decode(out.token_ids)
                for stop in self.params.stop or []:
                    if stop in out.text:  # TensorRT-LLM cuts the stop string (include_stop_str_in_output=False)
                        out.text = out.text[: out.text.index(stop)]
                        out.finish_reason = "stop"
                        yield RequestOutput([out], True)
                        return
                last = i + 1 == min(len(tokens), self.params.max_tokens)
                if last:
                    out.finish_reason = "length" if self.params.max_tokens <= len(tokens) else "stop"
                yield RequestOutput([out], last)
        finally:
            self.llm.active.discard(self)

    def __aiter__(self):
        return self._stream()


class LLM:
    def __init__(self, model: str = "", tokenizer=None, script: str = "", step_s: float = 0.002, **kwargs):
        self.model, self.tokenizer, self.script, self.step_s, self.kwargs = model, tokenizer, script, step_s, kwargs
        self.active: set[_Result] = set()
        self.aborted = 0
        self.requests: list[tuple[list[int], SamplingParams]] = []

    def generate_async(self, inputs, sampling_params: SamplingParams, streaming: bool = False):
        assert streaming, "the adapter always streams"
        self.requests.append((list(inputs), sampling_params))
        return _Result(self, inputs, sampling_params)
