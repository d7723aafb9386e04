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


def struct_to_json(struct) -> str:
    """A google.protobuf.Struct (a JSON Schema from a request) as JSON text. Struct holds every number as a double:
    integral ones are written back as integers ({"maxLength": 5}, not 5.0), as the caller wrote them."""
    from google.protobuf import json_format

    def fix(value):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return json.dumps(fix(json_format.MessageToDict(struct)), separators=(",", ":"), sort_keys=True)


MAX_CHOICES = 1024


def bounds_error(constraint: Constraint) -> str | None:
    """What is wrong with a constraint's size or shape, cheaply, before anything compiles it (None: nothing)."""
    if constraint.kind == "choice":
        choices = typing.cast(tuple, constraint.value)
        if not choices:
            return "is empty: give at least one choice"
        if len(choices) > MAX_CHOICES:
            return f"has {len(choices)} choices; at most {MAX_CHOICES} are allowed"
        if any(not c for c in choices):
            return "has an empty string: every choice must have at least one character"
        if sum(len(c) for c in choices) > MAX_CONSTRAINT_CHARS:
            return f"has more than {MAX_CONSTRAINT_CHARS} characters in all"
        return None
    text = typing.cast(str, constraint.value)
    if constraint.kind != "json_object" and not text.strip():
        return "is empty"
    if len(text) > MAX_CONSTRAINT_CHARS:
        return f"is {len(text)} characters; at most {MAX_CONSTRAINT_CHARS} are accepted"
    return None


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar (JSON text) of a constraint; ConstraintError for what is malformed before compiling."""
    import llguidance

    kind, value = constraint.kind, constraint.value
    error = bounds_error(constraint)
    if error is not None:
        raise ConstraintError(error)
    if kind == "choice":
        # A Lark string literal reads JSON's escapes, so json.dumps quotes any text.
        choices = typing.cast(tuple, value)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    text = typing.cast(str, value)
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


# llguidance tokenizers, one per (tokenizer path, vocabulary size, EOS ids) in a process: building one holds the
# GIL for about 0.9 s for SmolLM2's 49,152 tokens (measured; nothing else in the process runs meanwhile, an
# event loop included), so it is built once, where a stall is harmless (an engine builds it when it is created).
_tokenizers: dict[tuple, typing.Any] = {}
_tokenizers_lock = threading.Lock()


def _ll_tokenizer(hf, vocab_size: int, eos_token_ids: list[int], any_eos: bool):
    """The shared llguidance tokenizer; any_eos: one built with other EOS ids will do (validation only)."""
    import llguidance.hf

    name = str(getattr(hf, "name_or_path", "") or "")
    key = (name, vocab_size, tuple(eos_token_ids))
    with _tokenizers_lock:
        if name:
            found = _tokenizers.get(key)
            if found is None and any_eos:
                found = next((t for k, t in _tokenizers.items() if k[:2] == key[:2]), None)
            if found is not None:
                return found
        built = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos_token_ids or None)
        if name:
            _tokenizers[key] = built
        return built


class GrammarCompiler:
    """Compiles constraints against one tokenizer, caching the last max_cached distinct ones (errors too).

    Thread-safe. The llguidance tokenizer is built on first use (or by warm()) and shared within the process.
    validation_only: a compiler that only checks constraints (the gateway's), for which the EOS ids do not matter.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, eos_token_ids: typing.Iterable[int] | None = None,
                 max_cached: int = 256, validation_only: bool = False):
        self._hf = tokenizer
        self._validation_only = validation_only
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
                self._tokenizer = _ll_tokenizer(self._hf, self.vocab_size, self.eos_token_ids, self._validation_only)
            return self._tokenizer

    def warm(self) -> None:
        """Builds the llguidance tokenizer now (blocking, about a second the first time in a process)."""
        _ = self.tokenizer

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
