"""Structured outputs: decoding constraints compiled with llguidance against a tokenizer's vocabulary.

A constraint (SamplingParams.structured) is a JSON schema, any JSON object, a regex, a list of choices or a Lark
grammar (GBNF, as llama.cpp writes it, is converted). GrammarCompiler compiles it once per distinct constraint (an
LRU cache of pristine matchers); each sequence gets its own Matcher, a copy that advances with every accepted token
and fills that sequence's row of the step's token bitmask (one bit per vocabulary id, 1 = allowed). End-of-sequence
is allowed only where the grammar accepts.

The gateway compiles too (it has the version's tokenizer), so that a constraint the engine cannot compile is
INVALID_ARGUMENT before dispatch; the worker compiles again, with the same code, and refuses the same way.

Why llguidance (bench/structured.py measures both on SmolLM2's 49,152-token vocabulary): masks take about 12-16 us
per step against xgrammar's 2-4 us, both far below one decode step (milliseconds), while a schema compiles in
about 1.4 ms against xgrammar's 9 ms (a tool's schema is often new), its errors are plain sentences, and its wheel
brings no CUDA compiler (xgrammar's pulls triton).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import typing

if typing.TYPE_CHECKING:
    import llguidance
    import torch

    from llmserve.dispatch.v1 import task_pb2

# JSON as the model writes it: OpenAI's and json.dumps' separators, no free whitespace (a small model could fill
# its whole budget with newlines and never close the object).
JSON_OPTIONS: typing.Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CONSTRAINT_CHARS = 64 * 1024


class ConstraintError(ValueError):
    """A constraint that cannot be compiled. Raised by GrammarCompiler.compile, str() is "<field> <why>" (the
    request field first); inside, the reason alone."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One decoding constraint, independent of the protobuf: kind is json_schema, json_object, regex, choice or
    grammar; value is the schema / pattern / grammar text, or the tuple of choices."""

    kind: str
    value: str | tuple[str, ...] = ""
    field: str = ""  # the request field it came from, for error messages (not part of the cache key)

    def key(self) -> tuple[str, str | tuple[str, ...]]:
        return self.kind, self.value

    def describe(self) -> str:
        return self.field or f"structured.{self.kind}"

    @classmethod
    def from_pb(cls, pb: task_pb2.StructuredConstraint, field: str = "") -> Constraint | None:
        kind = pb.WhichOneof("kind")
        if kind is None or (kind == "json_object" and not pb.json_object):
            return None
        if kind == "choice":
            return cls("choice", tuple(pb.choice.choices), field)
        if kind == "json_object":
            return cls("json_object", "", field)
        return cls(kind, getattr(pb, kind), field)

    def to_pb(self) -> task_pb2.StructuredConstraint:
        from llmserve.dispatch.v1 import task_pb2

        if self.kind == "choice":
            return task_pb2.StructuredConstraint(choice=task_pb2.ChoiceList(choices=list(self.value)))
        if self.kind == "json_object":
            return task_pb2.StructuredConstraint(json_object=True)
        return task_pb2.StructuredConstraint(**{self.kind: typing.cast(typing.Any, self.value)})


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar (JSON text) of a constraint; ConstraintError for what is malformed before compiling."""
    import llguidance

    kind, value = constraint.kind, constraint.value
    if kind == "choice":
        choices = typing.cast(tuple, value)
        if not choices:
            raise ConstraintError("is empty: give at least one choice")
        if any(not c for c in choices):
            raise ConstraintError("has an empty string: every choice must have at least one character")
        if sum(len(c) for c in choices) > MAX_CONSTRAINT_CHARS:
            raise ConstraintError(f"has more than {MAX_CONSTRAINT_CHARS} characters in all")
        # A Lark string literal reads JSON's escapes, so json.dumps quotes any text.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    text = typing.cast(str, value)
    if kind != "json_object" and not text.strip():
        raise ConstraintError("is empty")
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"is {len(text)} characters; at most {MAX_CONSTRAINT_CHARS} are accepted")
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise ConstraintError(f"is not valid JSON: {exc}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise ConstraintError(f"must be a JSON object (a JSON Schema), not {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "grammar":
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            lark = any_to_lark(text)
        except GbnfToLarkError as exc:
            raise ConstraintError(f"is neither Lark (a 'start:' rule) nor valid GBNF: {exc}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise ConstraintError(f"has an unknown constraint kind {kind!r}")


def _clean(message: str) -> str:
    """llguidance's message without the grammar it echoes back, on one short line."""
    message = message.split("<state>")[0].split("<grammar>")[0].strip()
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    text = " | ".join(lines)
    return text if len(text) <= 600 else text[:600] + "..."


class Matcher:
    """One sequence's position in its grammar."""

    __slots__ = ("_m",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher

    @property
    def raw(self) -> llguidance.LLMatcher:
        return self._m

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed tokens of the next step into bitmask[row] (int32, contiguous, CPU)."""
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it (the matcher is then dead)."""
        return bool(self._m.consume_token(token))

    @property
    def is_accepting(self) -> bool:
        return bool(self._m.is_accepting())

    @property
    def is_stopped(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return _clean(self._m.get_error()) if self._m.is_error() else ""


class CompiledGrammar:
    """A compiled constraint; matcher() gives each sequence its own state (a cheap copy of the pristine one)."""

    def __init__(self, matcher: llguidance.LLMatcher, constraint: Constraint):
        self._pristine = matcher
        self.constraint = constraint
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:  # deep_copy reads the pristine state; copies are independent
            return Matcher(self._pristine.deep_copy())


class GrammarCompiler:
    """Compiles constraints against one tokenizer, caching the last max_cached distinct ones (errors too).

    Thread-safe. Building the llguidance tokenizer takes about 0.7 s for SmolLM2: it happens on first use.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, eos_token_ids: typing.Iterable[int] | None = None,
                 max_cached: int = 256):
        self._hf = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
        eos = sorted(set(eos_token_ids or [])) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                    else [])
        self.eos_token_ids = [int(t) for t in eos]
        self.max_cached = max_cached
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[tuple, CompiledGrammar | ConstraintError] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self.num_compiled = 0  # compilations done (cache misses)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The compiled grammar, from the cache when the same constraint was compiled before; ConstraintError."""
        key = constraint.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(constraint)
            with self._lock:
                self._cache[key] = hit
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        if isinstance(hit, ConstraintError):  # cached as the reason alone: name this request's field
            raise ConstraintError(f"{constraint.describe()} {hit}")
        return hit

    def _compile(self, constraint: Constraint) -> CompiledGrammar | ConstraintError:
        import llguidance

        self.num_compiled += 1
        try:
            grammar = grammar_of(constraint)
        except ConstraintError as exc:
            return exc
        except (ValueError, TypeError) as exc:
            return ConstraintError(f"cannot be compiled: {_clean(str(exc))}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return ConstraintError(f"cannot be compiled: {_clean(matcher.get_error())}")
        return CompiledGrammar(matcher, constraint)

    def __len__(self) -> int:
        return len(self._cache)
