"""The engine contract: what the worker service may call on an engine, and the records that cross it.

The worker drives every engine through these two Protocols and never imports an implementation:
  GenerationEngine  PagedEngine (PyTorch, engine/paged/), TensorRTLLMEngine (engine/trtllm.py)
  EmbeddingEngine   TorchEmbeddingEngine (engine/embedding.py)
`make_engine(version, config)` (engine/factory.py) picks and loads one from a registry version.
tests/worker/test_engine_contract.py runs the same checks against each implementation.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

if typing.TYPE_CHECKING:
    from llmserve.common.tools import ToolSpec

Priority = int  # 1 interactive, 2 standard, 3 batch (the Priority enum's values; lower is served first)
FinishReason = str  # "stop", "length", "abort" or "error"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => disabled
    seed: int | None = None  # reproducible sampling per request (own torch.Generator)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Log probabilities are the model's own log-softmax of its raw logits, before temperature, top-p and top-k.
    logprobs: bool = False  # one TokenLogprob per generated token
    top_logprobs: int = 0  # alternatives per position (generated and prompt tokens)
    prompt_logprobs: bool = False  # one TokenLogprob per prompt token (the first has none); max_tokens may be 0
    # Logit changes, per row (engines with supports_penalties): OpenAI's presence/frequency penalties over the
    # generated tokens, HF/vLLM's repetition penalty over prompt + generated tokens (1 disables it), OpenAI's
    # logit_bias (token id -> bias added), and min_tokens before EOS or a stop_token_ids token may be sampled.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # finish ("stop") when sampled; not part of the text
    # A compiled decoding constraint (common.structured.CompiledGrammar, from the engine's compile_constraint);
    # each sequence gets its own matcher. None: unconstrained.
    structured: typing.Any = None

    @property
    def changes_logits(self) -> bool:
        """Whether any of the per-row logit changes above is asked for."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty not in (0.0, 1.0)
                    or self.logit_bias or self.min_tokens or self.stop_token_ids)


@dataclass
class TopLogprob:
    token_id: int
    logprob: float
    token: bytes  # the token's bytes (UTF-8, possibly part of a character)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing before it)
    token: bytes
    top: list[TopLogprob] = field(default_factory=list)  # most likely first


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: Priority = 2
    # Prefix-cache partition (the tenant): cached KV is shared only between requests with equal salts. Never logged.
    cache_salt: str = ""
    # LoRA adapter (a name given to the engine's add_adapter) applied on top of the base weights; "" for none.
    adapter: str = ""
    # A stream migrated from a lost worker (engines with supports_resume): the tokens it had generated, continued
    # as if it had not stopped (they count as generated, a seeded generator skips their draws), and how many
    # characters of their text the client already has (the rest, held back there, comes with the next output).
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text_length: int = 0


@dataclass
class GenerationOutput:
    """One per engine step that produced text for the request, and a final one (finished=True)."""

    request_id: str
    text_delta: str
    finished: bool = False
    finish_reason: FinishReason | None = None  # "stop" (EOS or stop string), "length", "abort", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    error: str | None = None  # set with finish_reason "error": what went wrong, for the caller's status message
    cached_tokens: int = 0  # prompt tokens whose prefill a prefix cache skipped (0 where an engine has none)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens generated since the previous output
    prompt_logprobs: list[TokenLogprob] | None = None  # set once, on the first output, when asked for
    token_ids: list[int] = field(default_factory=list)  # ids of the tokens generated since the previous output


@dataclass
class EngineLoad:
    num_running: int
    num_waiting: int
    max_num_seqs: int


@dataclass
class EngineStats:
    """Counters for metrics; an engine without a paged KV cache reports zeros for its KV fields."""

    num_steps: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_cached_kv_blocks: int = 0  # free or in use, holding a reusable prefix
    block_size: int = 0
    num_prefix_hit_tokens: int = 0  # since start
    num_preemptions: int = 0  # since start


@typing.runtime_checkable
class GenerationEngine(typing.Protocol):
    """Streams tokens for requests that join and leave a running batch at any time."""

    max_num_seqs: int

    @property
    def context_length(self) -> int:
        """Prompt + completion tokens one sequence may hold."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt (no special tokens added)."""

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: typing.Sequence[ToolSpec] = ()) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn (or, with
        continue_final_message, ending inside the last message, which the model continues); with the tools and
        the messages' tool calls and results templated by common/tools.chat_ids."""

    def generate(self, request: GenerationRequest) -> typing.AsyncIterator[GenerationOutput]:
        """Outputs as they come; the last has finished=True. Leaving the iterator early aborts the request."""

    def abort(self, request_id: str) -> None:
        """Stops a request and frees what it holds within one engine step (safe from any thread)."""

    def load(self) -> EngineLoad: ...

    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

    async def stop(self) -> None:
        """Aborts every request and releases the engine's threads."""


@typing.runtime_checkable
class EmbeddingEngine(typing.Protocol):
    """Embeds texts, batching concurrent calls."""

    max_num_seqs: int  # texts per batch

    @property
    def context_length(self) -> int:
        """Tokens one text may have."""

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """(one unit vector per input, input tokens in all); an input is a text or token ids (embedded as given)."""

    def load(self) -> EngineLoad: ...

    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(i) for i in ids if i is not None}
