"""The worker's engine interface: the records that cross it, shared by every engine.

Engines (PagedEngine in paged_engine.py; TensorRTLLMEngine in trtllm.py) take a GenerationRequest through
`generate()` (an async iterator of GenerationOutput) and offer abort(request_id), load(), start()/stop(),
context_length, encode() and apply_chat_template(); the worker never knows which one it drives.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(i) for i in ids if i is not None}
