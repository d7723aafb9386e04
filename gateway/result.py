"""A finished request's outputs (what the response cache stores and responses are built from), and the collector
that merges a request's task outputs into one."""

from __future__ import annotations

import dataclasses
import time
import typing

from llmserve.dispatch.v1 import task_pb2
from llmserve.gateway import metrics
from llmserve.gateway.requests import Call
from llmserve.inference.v1 import inference_pb2 as pb


@dataclasses.dataclass
class Result:
    choices: list[tuple[str, str]]  # generation: (text, finish_reason) by choice index
    vectors: list[list[float]]  # embeddings: one per input, in order
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the workers' prefix cache did not compute again

    def to_json(self) -> dict:
        data: dict[str, typing.Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.choices:
            data["choices"] = self.choices
        if self.vectors:
            data["vectors"] = self.vectors
        return data

    @classmethod
    def from_json(cls, data: dict) -> Result:
        # Served from the response cache: no prompt token is computed again.
        return cls([tuple(c) for c in data.get("choices", ())], data.get("vectors", []), data["prompt_tokens"],
                   data.get("completion_tokens", 0), data["prompt_tokens"])

    def usage(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        total_tokens=self.prompt_tokens + self.completion_tokens,
                        prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=self.cached_tokens))


class Collector:
    """Task outputs by choice index (input * n + choice) -> one Result, timing text deltas."""

    def __init__(self, call: Call, version: str):
        num_tasks = call.num_sequences
        self.n, self.is_embedding, self.version = call.n, call.kind == "embedding", version
        self.texts: list[list[str]] = [[] for _ in range(num_tasks)]
        self.reasons = [""] * num_tasks
        self.prompt_tokens = [0] * num_tasks
        self.completion_tokens = [0] * num_tasks
        self.cached_tokens = [0] * num_tasks
        self.vectors: list[list[float]] = []
        self.started = time.perf_counter()
        self.last_delta: dict[int, float] = {}  # task index -> when its previous delta arrived

    def add(self, index: int, output: task_pb2.TaskOutput) -> None:
        if output.text_delta:
            now = time.perf_counter()
            if not self.last_delta:
                metrics.TTFT.labels(self.version).observe(now - self.started)
            if index in self.last_delta:
                metrics.INTER_TOKEN.labels(self.version).observe(now - self.last_delta[index])
            self.last_delta[index] = now
        self.texts[index].append(output.text_delta)
        self.prompt_tokens[index] = output.prompt_tokens
        self.completion_tokens[index] = output.completion_tokens
        self.cached_tokens[index] = output.cached_tokens
        if output.finish_reason:  # the choice's last output (finished: the task's last)
            self.reasons[index] = output.finish_reason
        if output.embeddings:
            self.vectors = [list(v.values) for v in output.embeddings]

    def result(self) -> Result:
        """What arrived so far; complete once every task finished. The prompt is counted once per input, not once
        per choice (as OpenAI does)."""
        firsts = range(0, len(self.texts), self.n)
        choices = [] if self.is_embedding else [("".join(t), r) for t, r in zip(self.texts, self.reasons, strict=True)]
        return Result(choices, self.vectors, sum(self.prompt_tokens[i] for i in firsts), sum(self.completion_tokens),
                      sum(self.cached_tokens[i] for i in firsts))
