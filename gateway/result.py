"""A finished request's outputs (what the response cache stores and responses are built from), and the collector
that merges a request's task outputs into one."""

from __future__ import annotations

import codecs
import dataclasses
import time
import typing

from llmserve.dispatch.v1 import task_pb2
from llmserve.gateway import metrics
from llmserve.gateway.requests import Call
from llmserve.inference.v1 import inference_pb2 as pb


def token_text(data: bytes) -> str:
    """A token's text as OpenAI writes it: its UTF-8, or "bytes:\\xNN..." when it holds part of a character."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclasses.dataclass
class Logprob:
    """One token of a choice (prompt or generated) with its log probability and the top alternatives."""

    token_id: int
    token: bytes
    logprob: float | None  # None: the first prompt token
    top: list[tuple[int, bytes, float]]  # (token id, bytes, logprob), most likely first
    text_offset: int = 0  # character offset in the choice's text

    @classmethod
    def from_pb(cls, entry: task_pb2.TokenLogprob, *, is_first_prompt_token: bool = False) -> Logprob:
        return cls(entry.token_id, entry.token, None if is_first_prompt_token else entry.logprob,
                   [(t.token_id, t.token, t.logprob) for t in entry.top])

    def to_pb(self) -> pb.TokenLogprob:
        entry = pb.TokenLogprob(token=token_text(self.token), bytes=list(self.token), token_id=self.token_id,
                                text_offset=self.text_offset,
                                top_logprobs=[pb.TopLogprob(token=token_text(b), logprob=v, bytes=list(b), token_id=t)
                                              for t, b, v in self.top])
        if self.logprob is not None:
            entry.logprob.value = self.logprob
        return entry

    def to_json(self) -> list:
        return [self.token_id, self.token.hex(), self.logprob, [[t, b.hex(), v] for t, b, v in self.top],
                self.text_offset]

    @classmethod
    def from_json(cls, data: list) -> Logprob:
        token_id, token, logprob, top, offset = data
        return cls(token_id, bytes.fromhex(token), logprob, [(t, bytes.fromhex(b), v) for t, b, v in top], offset)


def logprobs_pb(entries: list[Logprob] | None) -> pb.ChoiceLogprobs | None:
    return None if entries is None else pb.ChoiceLogprobs(content=[e.to_pb() for e in entries])


@dataclasses.dataclass
class Delta:
    """What one task output adds to its choice, as the caller sees it (echo and text offsets applied)."""

    text: str
    logprobs: list[Logprob] | None  # None: logprobs not asked for


@dataclasses.dataclass
class Result:
    choices: list[tuple[str, str]]  # generation: (text, finish_reason) by choice index
    vectors: list[list[float]]  # embeddings: one per input, in order
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the workers' prefix cache did not compute again
    logprobs: list[list[Logprob]] | None = None  # by choice index, when asked for
    # By choice index: the deltas it arrived in, as (characters, logprob entries), so that a stream served from the
    # response cache replays in the same pieces (entries cached before this was kept: one piece per choice).
    pieces: list[list[tuple[int, int]]] | None = None

    def to_json(self) -> dict:
        data: dict[str, typing.Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.choices:
            data["choices"] = self.choices
        if self.vectors:
            data["vectors"] = self.vectors
        if self.logprobs is not None:
            data["logprobs"] = [[e.to_json() for e in entries] for entries in self.logprobs]
        if self.pieces is not None:
            data["pieces"] = self.pieces
        return data

    @classmethod
    def from_json(cls, data: dict) -> Result:
        # Served from the response cache: no prompt token is computed again.
        logprobs, pieces = data.get("logprobs"), data.get("pieces")
        return cls([tuple(c) for c in data.get("choices", ())], data.get("vectors", []), data["prompt_tokens"],
                   data.get("completion_tokens", 0), data["prompt_tokens"],
                   None if logprobs is None else [[Logprob.from_json(e) for e in entries] for entries in logprobs],
                   None if pieces is None else [[(c, n) for c, n in choice] for choice in pieces])

    def replay(self, index: int) -> typing.Iterator[tuple[str, list[Logprob] | None, bool]]:
        """Choice `index` as the deltas it was generated in: (text, logprob entries or None, is_last)."""
        text = self.choices[index][0]
        entries = None if self.logprobs is None else self.logprobs[index]
        pieces = self.pieces[index] if self.pieces is not None else [(len(text), len(entries or ()))]
        chars = lps = 0
        for k, (num_chars, num_entries) in enumerate(pieces):
            yield (text[chars:chars + num_chars], None if entries is None else entries[lps:lps + num_entries],
                   k == len(pieces) - 1)
            chars, lps = chars + num_chars, lps + num_entries
        if not pieces:
            yield "", None if entries is None else [], True

    def choice_logprobs(self, index: int) -> pb.ChoiceLogprobs | None:
        return None if self.logprobs is None else logprobs_pb(self.logprobs[index])

    def usage(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        total_tokens=self.prompt_tokens + self.completion_tokens,
                        prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=self.cached_tokens))


class Collector:
    """Task outputs by choice index (input * n + choice) -> one Result, timing text deltas. With echo a choice's
    text starts with its prompt (and, with logprobs, its entries with the prompt's)."""

    def __init__(self, call: Call, version: str):
        num_tasks = call.num_sequences
        self.n, self.is_embedding, self.version = call.n, call.kind == "embedding", version
        sampling = getattr(call, "sampling", None)
        self.wants_logprobs = bool(sampling and sampling.logprobs)
        self.echo_texts: tuple[str, ...] = getattr(call, "prompts", ()) if getattr(call, "echo", False) else ()
        self.texts: list[list[str]] = [[] for _ in range(num_tasks)]
        self.pieces: list[list[tuple[int, int]]] = [[] for _ in range(num_tasks)]
        self.logprobs: list[list[Logprob]] = [[] for _ in range(num_tasks)]
        self.offsets = [0] * num_tasks  # characters of each choice's tokens so far (text_offset of the next)
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(num_tasks)]
        self.reasons = [""] * num_tasks
        self.prompt_tokens = [0] * num_tasks
        self.completion_tokens = [0] * num_tasks
        self.cached_tokens = [0] * num_tasks
        self.vectors: list[list[float]] = []
        self.started = time.perf_counter()
        self.last_delta: dict[int, float] = {}  # task index -> when its previous delta arrived

    def _entries(self, index: int, entries, *, is_prompt: bool) -> list[Logprob]:
        out = []
        for k, entry in enumerate(entries):
            logprob = Logprob.from_pb(entry, is_first_prompt_token=is_prompt and k == 0)
            logprob.text_offset = self.offsets[index]
            # A character split over tokens counts once, at the token that completes it.
            self.offsets[index] += len(self.decoders[index].decode(logprob.token))
            out.append(logprob)
        self.logprobs[index].extend(out)
        return out

    def add(self, index: int, output: task_pb2.TaskOutput) -> Delta:
        if output.text_delta:
            now = time.perf_counter()
            if not self.last_delta:
                metrics.TTFT.labels(self.version).observe(now - self.started)
            if index in self.last_delta:
                metrics.INTER_TOKEN.labels(self.version).observe(now - self.last_delta[index])
            self.last_delta[index] = now
        text = output.text_delta
        if self.echo_texts and not self.texts[index]:  # the choice's first output
            text = self.echo_texts[index // self.n] + text
        self.texts[index].append(text)
        delta = Delta(text, None)
        if self.wants_logprobs:
            delta.logprobs = []
            if self.echo_texts and output.prompt_logprobs:
                delta.logprobs += self._entries(index, output.prompt_logprobs, is_prompt=True)
            delta.logprobs += self._entries(index, output.logprobs, is_prompt=False)
        if text or delta.logprobs or output.finish_reason:  # what a stream sends a chunk for
            self.pieces[index].append((len(text), len(delta.logprobs or ())))
        self.prompt_tokens[index] = output.prompt_tokens
        self.completion_tokens[index] = output.completion_tokens
        self.cached_tokens[index] = output.cached_tokens
        if output.finish_reason:  # the choice's last output (finished: the task's last)
            self.reasons[index] = output.finish_reason
        if output.embeddings:
            self.vectors = [list(v.values) for v in output.embeddings]
        return delta

    def result(self) -> Result:
        """What arrived so far; complete once every task finished. The prompt is counted once per input, not once
        per choice (as OpenAI does)."""
        firsts = range(0, len(self.texts), self.n)
        choices = [] if self.is_embedding else [("".join(t), r) for t, r in zip(self.texts, self.reasons, strict=True)]
        return Result(choices, self.vectors, sum(self.prompt_tokens[i] for i in firsts), sum(self.completion_tokens),
                      sum(self.cached_tokens[i] for i in firsts), self.logprobs if self.wants_logprobs else None,
                      None if self.is_embedding else self.pieces)
