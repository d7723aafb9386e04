"""Public requests -> validated plain records (from_pb), with messages that name the field and the allowed range;
records -> scheduler tasks (to_pb). The rules that need the model version (context length) live here too.

Every size a caller controls is bounded (GatewayConfig), and the cheap bounds come first: counts before anything
iterates, bytes against the model's context before anything is templated or tokenized.

Priority is normalised here, once: every task leaves the gateway with priority 1..3 (interactive, standard, batch).
"""

from __future__ import annotations

import dataclasses
import typing

from llmserve.admin.v1 import registry_pb2
from llmserve.common import priority
from llmserve.common.config import GatewayConfig
from llmserve.common.errors import invalid_argument
from llmserve.common.structured import Constraint, bounds_error, struct_to_json
from llmserve.common.tokenizers import chat_message
from llmserve.common.tools import ToolCall, ToolSpec, call_to_pb, chat_ids, spec_to_pb
from llmserve.dispatch.v1 import task_pb2
from llmserve.gateway.tools import ToolUse, message_tools_from_pb, tool_use_from_pb
from llmserve.inference.v1 import inference_pb2 as pb

if typing.TYPE_CHECKING:
    from llmserve.gateway.tokens import TokenCount

ROLES = ("system", "user", "assistant", "tool")
MAX_NAME_LENGTH = 64  # a message's `name`, as OpenAI allows
# Registry label of an embedding model trained for truncated vectors (Matryoshka): the lengths it supports, "64,128".
MATRYOSHKA_LABEL = "matryoshka_dimensions"
INT64_MASK = (1 << 63) - 1
SHOWN_CHARS = 40  # a caller's value quoted in an error message is cut to this many characters


def _shown(value: str) -> str:
    """repr(value) for an error message, cut short: a refusal never echoes megabytes back."""
    return repr(value) if len(value) <= SHOWN_CHARS else repr(value[:SHOWN_CHARS]) + f"... ({len(value)} characters)"


def _check_prompt_bytes(field: str, text_bytes: int, version: registry_pb2.ModelVersion, cfg: GatewayConfig) -> None:
    limit = version.context_length * cfg.max_prompt_bytes_per_token
    if version.context_length and text_bytes > limit:
        raise invalid_argument(f"{field} is {text_bytes} bytes, more than model {version.version!r} can take: its "
                               f"context length of {version.context_length} tokens holds at most {limit} bytes of "
                               f"text ({cfg.max_prompt_bytes_per_token} per token); shorten the {field}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_tokens: int
    max_tokens_is_default: bool
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: bool = False  # the tokens' log probabilities, with top_logprobs alternatives each
    top_logprobs: int = 0
    prompt_logprobs: bool = False  # echo: the prompt's too (also to score it with max_tokens 0)
    # Per-row logit changes (worker/engine/paged/sampler.py) and a decoding constraint (common/structured.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0  # 0: unset (1, none)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    structured: Constraint | None = None

    @property
    def is_deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None

    def to_pb(self) -> task_pb2.SamplingParams:
        """The sampling of a task (the worker draws choice j from seed + j, so choices differ)."""
        seed = None if self.seed is None else self.seed & INT64_MASK
        return task_pb2.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, has_seed=seed is not None,
            seed=seed or 0, max_tokens=self.max_tokens, stop=self.stop, ignore_eos=self.ignore_eos,
            max_tokens_is_default=self.max_tokens_is_default, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
            prompt_logprobs=self.prompt_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias), min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids,
            structured=self.structured.to_pb() if self.structured is not None else None)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is templated beyond its (role, content) pairs; the worker applies the same."""

    names: tuple[str, ...] = ()  # per message ("" for none); empty when no message has a name
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # assistant prefill: the model continues the last message
    tools: tuple[ToolSpec, ...] = ()  # shown to the model (common/tools.py templates them)
    tool_calls: tuple[tuple[ToolCall, ...], ...] = ()  # per message; empty when no message has tool fields
    tool_call_ids: tuple[str, ...] = ()  # per message ("" for none), likewise

    @property
    def is_set(self) -> bool:
        return self != ChatTemplate()

    def conversation(self, messages: tuple[tuple[str, str], ...]) -> list[dict]:
        out: list[dict] = [chat_message(r, c, self.names[k] if self.names else "") for k, (r, c) in enumerate(messages)]
        for k, message in enumerate(out):
            if self.tool_calls and self.tool_calls[k]:
                message["tool_calls"] = list(self.tool_calls[k])
            if self.tool_call_ids and self.tool_call_ids[k]:
                message["tool_call_id"] = self.tool_call_ids[k]
        return out

    def ids(self, tokenizer, messages: tuple[tuple[str, str], ...]) -> list[int]:
        return chat_ids(tokenizer, self.conversation(messages), self.tools,
                        add_generation_prompt=self.add_generation_prompt,
                        continue_final_message=self.continue_final_message)

    def messages_pb(self, messages: tuple[tuple[str, str], ...]) -> list[pb.ChatMessage]:
        return [pb.ChatMessage(role=r, content=c, name=self.names[k] if self.names else "",
                               tool_calls=[call_to_pb(x) for x in self.tool_calls[k]] if self.tool_calls else (),
                               tool_call_id=self.tool_call_ids[k] if self.tool_call_ids else "")
                for k, (r, c) in enumerate(messages)]


@dataclasses.dataclass(frozen=True)
class GenerationCall:
    model_kind: typing.ClassVar[int] = registry_pb2.MODEL_KIND_GENERATE
    ids_field: typing.ClassVar[str] = "prompt_token_ids"  # how the caller names token-id prompts
    kind: str  # "completion" or "chat"
    model: str
    prompts: tuple[str, ...]  # completion: one or more prompts
    messages: tuple[tuple[str, str], ...]  # chat: (role, content)
    sampling: Sampling
    n: int
    user: str
    priority: int  # 1..3
    skip_cache: bool
    # completion: prompts given as token ids (prompts then holds their decoded text, for echo, once the pipeline
    # has checked them against the version's vocabulary)
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    echo: bool = False  # completion: the prompt in front of the text (and its logprobs, with logprobs)
    template: ChatTemplate | None = None  # chat: names, tools, and how the conversation ends (prefill)
    tool_use: ToolUse | None = None  # chat: the request's tools and tool_choice (how answers are parsed)

    @property
    def num_inputs(self) -> int:
        if self.kind == "chat":
            return 1
        return len(self.prompt_ids) or len(self.prompts)

    def field_name(self, i: int) -> str:
        """How the caller named input i."""
        if self.kind == "chat":
            return "messages"
        if self.prompt_ids:
            return "prompt_token_ids" if self.num_inputs == 1 else f"prompt_token_ids[{i}]"
        return "prompt" if self.num_inputs == 1 else f"prompts[{i}]"

    @property
    def num_sequences(self) -> int:
        return self.num_inputs * self.n  # choices, by index input * n + choice

    @property
    def is_cacheable(self) -> bool:
        return self.sampling.is_deterministic and not self.skip_cache

    @property
    def max_completion_tokens(self) -> int:
        """What the limits reserve for the completion before it runs."""
        return self.num_sequences * self.sampling.max_tokens

    def cache_fields(self) -> dict:
        """What decides the output: everything but user, priority and cache control."""
        return {"kind": self.kind, "prompts": self.prompts, "messages": self.messages, "n": self.n,
                "sampling": dataclasses.asdict(self.sampling), "prompt_ids": self.prompt_ids, "echo": self.echo,
                **({"template": dataclasses.asdict(self.template)} if self.template and self.template.is_set
                   else {}), **({"tool_use": self.tool_use.cache_fields()} if self.tool_use else {})}

    def count_inputs(self) -> dict:
        """What to count prompt tokens of: the prompts, or the conversation (templated)."""
        if self.kind == "chat":
            return {"messages": self.messages, "template": self.template}
        return {"token_ids": self.prompt_ids} if self.prompt_ids else {"texts": self.prompts}

    def check_prompt_bytes(self, version: registry_pb2.ModelVersion, cfg: GatewayConfig) -> None:
        """Refuses text that cannot fit the version's context whatever its tokens, before it is tokenized."""
        if self.kind == "chat":
            tool_bytes = self.tool_use.num_bytes if self.tool_use else 0
            _check_prompt_bytes("messages", sum(len(c.encode()) for _, c in self.messages) + tool_bytes, version, cfg)
            return
        if self.prompt_ids:  # counted exactly, against the context, once the tokens are counted
            return
        for i, prompt in enumerate(self.prompts):
            _check_prompt_bytes("prompt" if self.num_inputs == 1 else f"prompts[{i}]", len(prompt.encode()), version,
                                cfg)

    def check_context_length(self, version: registry_pb2.ModelVersion, counted: TokenCount | None) -> None:
        """Refuses prompts the version can never serve, as the worker would (it keeps the final word)."""
        context, max_tokens = version.context_length, self.sampling.max_tokens
        if not context:
            return
        if counted is None or not counted.is_exact:  # every prompt is at least one token
            if not self.sampling.max_tokens_is_default and max_tokens >= context:
                raise invalid_argument(f"max_tokens ({max_tokens}) leaves no room for the prompt in the context "
                                       f"length of {context} tokens of model {version.version!r}: set max_tokens "
                                       f"below {context}")
            return
        for i, num_prompt in enumerate(counted.per_input):
            field = self.field_name(i)
            if num_prompt >= context:
                raise invalid_argument(f"{field} is {num_prompt} tokens, but model {version.version!r} has a context "
                                       f"length of {context} tokens: shorten the {field}")
            if num_prompt + max_tokens > context and not self.sampling.max_tokens_is_default:
                raise invalid_argument(f"{field} ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the "
                                       f"context length of {context} tokens of model {version.version!r}: set "
                                       f"max_tokens to at most {context - num_prompt} or shorten the {field}")

    def to_tasks(self, request_id: str, version: str, cache_salt: str = "", counted: TokenCount | None = None
                 ) -> list[task_pb2.Task]:
        """One task per input, ids <request id>-<input index>, each sampling the n choices of its input on one
        worker: the prompt travels, is tokenized and is prefilled once per input, not once per choice. With the
        gateway's exact count, the task carries the token ids and the worker does not tokenize again."""
        ids = counted.ids if counted is not None and counted.is_exact else ()
        sampling = self.sampling.to_pb()
        tasks = []
        for i in range(self.num_inputs):
            if self.kind == "chat":
                template = self.template or ChatTemplate()
                gen = task_pb2.GenerateInput(messages=template.messages_pb(self.messages),
                                             tools=[spec_to_pb(s) for s in template.tools])
                gen.continue_final_message = template.continue_final_message
                gen.omit_generation_prompt = not template.add_generation_prompt
            else:
                gen = task_pb2.GenerateInput(prompt=self.prompts[i] if self.prompts else "")
            gen.sampling.CopyFrom(sampling)
            gen.n = self.n
            if len(ids) == self.num_inputs:
                gen.prompt_token_ids.extend(ids[i])
            tasks.append(task_pb2.Task(request_id=f"{request_id}-{i}", model_version=version,
                                       priority=priority.to_pb(self.priority), generate=gen, cache_salt=cache_salt))
        return tasks


@dataclasses.dataclass(frozen=True)
class EmbeddingCall:
    model_kind: typing.ClassVar[int] = registry_pb2.MODEL_KIND_EMBED
    kind: typing.ClassVar[str] = "embedding"
    n: typing.ClassVar[int] = 1
    num_sequences: typing.ClassVar[int] = 1  # the worker batches the texts of one call
    max_completion_tokens: typing.ClassVar[int] = 0
    echo: typing.ClassVar[bool] = False
    ids_field: typing.ClassVar[str] = "input_token_ids"
    model: str
    inputs: tuple[str, ...]
    user: str
    priority: int  # 1..3
    skip_cache: bool
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # inputs given as token ids (then inputs is empty)
    encoding_format: str = "float"  # or "base64": how the response carries the vectors (not what is computed)
    dimensions: int | None = None  # cut the vectors to this length (models trained for it only)

    @property
    def num_inputs(self) -> int:
        return len(self.prompt_ids) or len(self.inputs)

    @property
    def is_cacheable(self) -> bool:
        return not self.skip_cache  # embeddings are deterministic

    def cache_fields(self) -> dict:
        """The whole vectors are cached; encoding and dimensions only shape the response."""
        return {"kind": "embedding", "inputs": self.inputs, **({"prompt_ids": self.prompt_ids} if self.prompt_ids
                                                              else {})}

    def count_inputs(self) -> dict:
        return {"token_ids": self.prompt_ids} if self.prompt_ids else {"texts": self.inputs}

    def check_prompt_bytes(self, version: registry_pb2.ModelVersion, cfg: GatewayConfig) -> None:
        for i, text in enumerate(self.inputs):
            _check_prompt_bytes(f"input[{i}]", len(text.encode()), version, cfg)
        self.check_dimensions(version)

    def check_dimensions(self, version: registry_pb2.ModelVersion) -> None:
        """dimensions only for a model trained for truncated vectors (Matryoshka), at a length it lists."""
        if self.dimensions is None:
            return
        supported = [d.strip() for d in version.labels.get(MATRYOSHKA_LABEL, "").split(",") if d.strip()]
        if not supported:
            raise invalid_argument(f"model {version.version!r} cannot shorten its vectors (dimensions="
                                   f"{self.dimensions}): it was not trained for truncated (Matryoshka) embeddings, "
                                   "so a cut vector would lose its meaning; leave dimensions out")
        if str(self.dimensions) not in supported:
            raise invalid_argument(f"dimensions={self.dimensions} is not supported by model {version.version!r}: "
                                   f"use one of {', '.join(supported)}")

    def check_context_length(self, version: registry_pb2.ModelVersion, counted: TokenCount | None) -> None:
        if not version.context_length or counted is None or not counted.is_exact:
            return
        for i, n in enumerate(counted.per_input):
            if n > version.context_length:
                raise invalid_argument(f"input[{i}] is {n} tokens, but model {version.version!r} accepts at most "
                                       f"{version.context_length}: shorten or split it")

    def to_tasks(self, request_id: str, version: str, cache_salt: str = "", counted: TokenCount | None = None
                 ) -> list[task_pb2.Task]:
        embed = task_pb2.EmbedInput(texts=self.inputs,
                                    token_ids=[pb.PromptTokenIds(token_ids=ids) for ids in self.prompt_ids])
        return [task_pb2.Task(request_id=f"{request_id}-0", model_version=version, cache_salt=cache_salt,
                              priority=priority.to_pb(self.priority), embed=embed)]


Call = GenerationCall | EmbeddingCall


def _priority(value: int) -> int:
    """The scheduling class 1..3; unset means standard."""
    try:
        return priority.from_pb(value)
    except ValueError as exc:
        raise invalid_argument(str(exc)) from None


def _model(name: str, cfg: GatewayConfig) -> str:
    if not name:
        raise invalid_argument("model is required: a model alias or version (ListModels shows them)")
    if len(name) > cfg.max_model_length:
        raise invalid_argument(f"model is {len(name)} characters; model names are at most {cfg.max_model_length} "
                               "(ListModels shows them)")
    return name


def _user(name: str, cfg: GatewayConfig) -> str:
    if len(name) > cfg.max_user_length:
        raise invalid_argument(f"user is {len(name)} characters; at most {cfg.max_user_length} are allowed: send "
                               "a shorter id (a hash of it, for example)")
    return name


MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
MAX_LOGIT_BIAS = 300  # logit_bias entries
MAX_STOP_TOKEN_IDS = 64
JSON_SCHEMA_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _schema_json(struct, field: str) -> str:
    """A schema Struct as JSON text; a number JSON cannot hold (NaN, Infinity) is INVALID_ARGUMENT naming field."""
    try:
        return struct_to_json(struct)
    except ValueError:  # json_format refuses to write NaN and Infinity
        raise invalid_argument(f"{field} has a number that is not finite (NaN or Infinity), which JSON cannot "
                               "hold") from None


def _constraint(request) -> Constraint | None:
    """The decoding constraint of response_format or structured_outputs (at most one of them constrains)."""
    found: list[Constraint] = []
    if request.HasField("response_format"):
        rf = request.response_format
        if rf.type in ("", "text"):
            if rf.HasField("json_schema"):
                raise invalid_argument("response_format.json_schema is set but response_format.type is "
                                       f"{rf.type or 'unset'!r}: set type to \"json_schema\"")
        elif rf.type == "json_object":
            found.append(Constraint("json_object", "", "response_format"))
        elif rf.type == "json_schema":
            if not rf.HasField("json_schema") or not rf.json_schema.HasField("schema"):
                raise invalid_argument("response_format.json_schema.schema is required with type \"json_schema\": "
                                       "give {\"name\": ..., \"schema\": {a JSON Schema object}}")
            name = rf.json_schema.name
            if len(name) > 64 or not set(name) <= JSON_SCHEMA_NAME_CHARS:
                raise invalid_argument(f"response_format.json_schema.name={_shown(name)} must be at most 64 "
                                       "characters of a-z, A-Z, 0-9, '_' and '-'")
            found.append(Constraint("json_schema", _schema_json(rf.json_schema.schema,
                                                                "response_format.json_schema.schema"),
                                    "response_format.json_schema.schema"))
        else:
            raise invalid_argument(f"response_format.type={_shown(rf.type)} is not supported: use \"text\", "
                                   "\"json_object\" or \"json_schema\"")
    if request.HasField("structured_outputs"):
        so = request.structured_outputs
        given = [name for name, present in (("json", so.HasField("json")), ("regex", bool(so.regex)),
                                            ("choice", bool(so.choice)), ("grammar", bool(so.grammar)),
                                            ("json_object", so.json_object)) if present]
        if len(given) != 1:
            raise invalid_argument("structured_outputs must set exactly one of json, regex, choice, grammar and "
                                   f"json_object; it sets {', '.join(given) if given else 'none'}")
        kind = given[0]
        if kind == "json":
            found.append(Constraint("json_schema", _schema_json(so.json, "structured_outputs.json"),
                                    "structured_outputs.json"))
        elif kind == "choice":
            found.append(Constraint("choice", tuple(so.choice), "structured_outputs.choice"))
        elif kind == "json_object":
            found.append(Constraint("json_object", "", "structured_outputs.json_object"))
        else:
            found.append(Constraint(kind, getattr(so, kind), f"structured_outputs.{kind}"))
    if len(found) > 1:
        raise invalid_argument("set either response_format (json_object or json_schema) or structured_outputs, "
                               "not both")
    if not found:
        return None
    error = bounds_error(found[0])
    if error is not None:
        raise invalid_argument(f"{found[0].describe()} {error}")
    return found[0]


def _logit_changes(request, max_tokens: int, max_tokens_given: bool) -> dict:
    """presence/frequency/repetition penalties, logit_bias, min_tokens and stop_token_ids, validated (token ids
    are checked against the vocabulary by the pipeline, which knows the version)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if not -2.0 <= value <= 2.0:  # NaN fails too
            raise invalid_argument(f"{name}={value:g} is out of range: it must be in [-2, 2] (0 disables it)")
    repetition = request.repetition_penalty
    if not (repetition == 0 or 0 < repetition <= 2.0):
        raise invalid_argument(f"repetition_penalty={repetition:g} is out of range: it must be in (0, 2]; 1 (or "
                               "leaving it out) disables it, above 1 discourages repeats")
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise invalid_argument(f"logit_bias has {len(request.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are "
                               "allowed")
    bias = tuple(sorted(request.logit_bias.items()))
    for token, value in bias:
        if token < 0:
            raise invalid_argument(f"logit_bias has the key {token}, which is not a token id: ids are >= 0")
        if not -100.0 <= value <= 100.0:
            raise invalid_argument(f"logit_bias[{token}]={value:g} is out of range: a bias must be in [-100, 100]")
    if request.min_tokens < 0:
        raise invalid_argument(f"min_tokens={request.min_tokens} is out of range: it must be >= 0")
    if request.min_tokens > max_tokens:
        raise invalid_argument(f"min_tokens={request.min_tokens} is more than max_tokens={max_tokens}"
                               f"{'' if max_tokens_given else ' (the default)'}: lower min_tokens or raise max_tokens")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid_argument(f"stop_token_ids has {len(request.stop_token_ids)} entries; at most "
                               f"{MAX_STOP_TOKEN_IDS} are allowed")
    for i, token in enumerate(request.stop_token_ids):
        if token < 0:
            raise invalid_argument(f"stop_token_ids[{i}]={token} is not a token id: ids are >= 0")
    return {"presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
            "repetition_penalty": repetition, "logit_bias": bias, "min_tokens": request.min_tokens,
            "stop_token_ids": tuple(request.stop_token_ids), "structured": _constraint(request)}


def _sampling(request, cfg: GatewayConfig, default_max_tokens: int, *, min_max_tokens: int = 1) -> Sampling:
    given = {name: getattr(request, name).value for name in ("max_tokens", "max_completion_tokens")
             if request.HasField(name)}
    if len(set(given.values())) > 1:
        raise invalid_argument(f"max_tokens={given['max_tokens']} and max_completion_tokens="
                               f"{given['max_completion_tokens']} differ: set only one of them")
    for name, value in given.items():
        if value < min_max_tokens:
            hint = " (0 only with echo, to score the prompt)" if "echo" in request.DESCRIPTOR.fields_by_name else ""
            raise invalid_argument(f"{name}={value} is out of range: it must be >= {min_max_tokens}{hint}")
    max_tokens = next(iter(given.values()), default_max_tokens)
    temperature = request.temperature.value if request.HasField("temperature") else 1.0
    if not 0.0 <= temperature <= 2.0:
        raise invalid_argument(f"temperature={temperature:g} is out of range: it must be in [0, 2]")
    top_p = request.top_p.value if request.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise invalid_argument(f"top_p={top_p:g} is out of range: it must be in (0, 1]")
    if request.top_k < 0:
        raise invalid_argument(f"top_k={request.top_k} is out of range: it must be >= 0 (0 disables it)")
    if len(request.stop) > cfg.max_stop:
        raise invalid_argument(f"stop has {len(request.stop)} strings; at most {cfg.max_stop} are allowed")
    logprobs, top_logprobs = False, 0
    if request.DESCRIPTOR.fields_by_name["logprobs"].message_type is not None:  # completions: an Int32Value
        if request.HasField("logprobs"):
            logprobs, top_logprobs = True, request.logprobs.value
            if not 0 <= top_logprobs <= MAX_LOGPROBS:
                raise invalid_argument(f"logprobs={top_logprobs} is out of range: it must be in [0, {MAX_LOGPROBS}]")
    else:  # chat: a flag and a count
        logprobs, top_logprobs = request.logprobs, request.top_logprobs
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise invalid_argument(f"top_logprobs={top_logprobs} is out of range: it must be in [0, {MAX_LOGPROBS}]")
        if top_logprobs and not logprobs:
            raise invalid_argument("top_logprobs needs logprobs: set logprobs to true, or leave top_logprobs out")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise invalid_argument("stop strings must not be empty")
        if len(stop) > cfg.max_stop_length:
            raise invalid_argument(f"stop[{i}] is {len(stop)} characters; at most {cfg.max_stop_length} are "
                                   "allowed: use a shorter stop string")
    return Sampling(temperature=temperature, top_p=top_p, top_k=request.top_k,
                    seed=request.seed.value & INT64_MASK if request.HasField("seed") else None,
                    max_tokens=max_tokens, max_tokens_is_default=not given,
                    stop=tuple(request.stop), ignore_eos=request.ignore_eos, logprobs=logprobs,
                    top_logprobs=top_logprobs, **_logit_changes(request, max_tokens, bool(given)))


def _n(request, cfg: GatewayConfig) -> int:
    n = request.n.value if request.HasField("n") else 1
    if not 1 <= n <= cfg.max_n:
        raise invalid_argument(f"n={n} is out of range: it must be in [1, {cfg.max_n}]")
    return n


def _one_or_many(request, single: str, many: str, limit: int) -> tuple[str, ...]:
    """The texts of a `single` string field or its `many` repeated twin (exactly one of them, none empty)."""
    one, several = getattr(request, single), getattr(request, many)
    if one and several:
        raise invalid_argument(f"set either {single} or {many}, not both")
    if len(several) > limit:  # counted before anything iterates them
        raise invalid_argument(f"{many} has {len(several)} entries; at most {limit} are allowed: split the request")
    texts = (one,) if one else tuple(several)
    if not texts:
        raise invalid_argument(f"{single} is required and must not be empty")
    for i, text in enumerate(texts):
        if not text:
            raise invalid_argument(f"{many}[{i}] must not be empty")
    return texts


def _prompt_ids(request, cfg: GatewayConfig) -> tuple[tuple[int, ...], ...]:
    """Token-id prompts (checked against the vocabulary by the pipeline, which knows the version)."""
    if request.prompt or request.prompts:
        raise invalid_argument("set one of prompt, prompts and prompt_token_ids, not several")
    return _token_id_lists(request.prompt_token_ids, "prompt_token_ids", "prompts", "prompt", cfg.max_prompts)


def _token_id_lists(entries, field: str, plural: str, singular: str, limit: int) -> tuple[tuple[int, ...], ...]:
    """Lists of token ids (prompts or embedding inputs): at most `limit`, none empty, no negative id."""
    if len(entries) > limit:  # counted before anything iterates them
        raise invalid_argument(f"{field} has {len(entries)} {plural}; at most {limit} are allowed: split the "
                               "request")
    lists = []
    for i, entry in enumerate(entries):
        if not entry.token_ids:
            raise invalid_argument(f"{field}[{i}] has no token ids: give each {singular} at least one")
        for j, token in enumerate(entry.token_ids):
            if token < 0:
                raise invalid_argument(f"{field}[{i}][{j}]={token} is not a token id: ids are >= 0")
        lists.append(tuple(entry.token_ids))
    return tuple(lists)


def completion_from_pb(request, cfg: GatewayConfig) -> GenerationCall:
    model = _model(request.model, cfg)
    prompts: tuple[str, ...] = ()
    if request.prompt_token_ids:
        prompt_ids = _prompt_ids(request, cfg)
    else:
        prompt_ids, prompts = (), _one_or_many(request, "prompt", "prompts", cfg.max_prompts)
    num_prompts = len(prompt_ids) or len(prompts)
    n = _n(request, cfg)
    if num_prompts * n > cfg.max_sequences_per_request:
        raise invalid_argument(f"{num_prompts} prompts x n={n} make {num_prompts * n} sequences; at most "
                               f"{cfg.max_sequences_per_request} per request: lower n or split the prompts")
    sampling = _sampling(request, cfg, cfg.default_completion_max_tokens, min_max_tokens=0 if request.echo else 1)
    if request.echo and (sampling.logprobs or sampling.max_tokens == 0):
        sampling = dataclasses.replace(sampling, prompt_logprobs=True)
    return GenerationCall("completion", model, prompts, (), sampling, n, _user(request.user, cfg),
                          _priority(request.priority), request.skip_cache, prompt_ids=prompt_ids, echo=request.echo)


def _messages(request, cfg: GatewayConfig) -> tuple[tuple[tuple[str, str], ...], ChatTemplate]:
    """A conversation's (role, content) pairs and how to template it (names, generation prompt, prefill)."""
    if not request.messages:
        raise invalid_argument("messages is required: at least one {role, content}")
    if len(request.messages) > cfg.max_messages:  # counted before anything iterates them
        raise invalid_argument(f"messages has {len(request.messages)} entries; at most {cfg.max_messages} are "
                               "allowed: send fewer messages (drop or summarize older turns)")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid_argument(f"messages[{i}].role={_shown(message.role)} is invalid; use one of "
                                   f"{', '.join(ROLES)}")
        if len(message.name) > MAX_NAME_LENGTH:
            raise invalid_argument(f"messages[{i}].name is {len(message.name)} characters; at most "
                                   f"{MAX_NAME_LENGTH} are allowed")
    if not any(m.content for m in request.messages):
        raise invalid_argument("messages must not all be empty: give at least one message some content")
    messages = tuple((m.role, m.content) for m in request.messages)
    names = tuple(m.name for m in request.messages) if any(m.name for m in request.messages) else ()
    prefill = request.continue_final_message
    add_generation_prompt = request.add_generation_prompt.value if request.HasField("add_generation_prompt") \
        else not prefill
    if prefill:
        if add_generation_prompt:
            raise invalid_argument("continue_final_message and add_generation_prompt cannot both be true: set "
                                   "add_generation_prompt to false (or leave it out) to continue the last message")
        last = request.messages[-1]
        if last.role != "assistant" or not last.content:
            raise invalid_argument(f"continue_final_message continues the last message, which must be the "
                                   f"assistant's and not empty; messages[{len(messages) - 1}] is "
                                   f"{'an empty ' if not last.content else 'a '}{_shown(last.role)} message")
    tools = message_tools_from_pb(request.messages)
    return messages, ChatTemplate(names, add_generation_prompt, prefill, tool_calls=tools.tool_calls,
                                  tool_call_ids=tools.tool_call_ids)


def chat_from_pb(request, cfg: GatewayConfig) -> GenerationCall:
    model = _model(request.model, cfg)
    messages, template = _messages(request, cfg)
    sampling = _sampling(request, cfg, cfg.default_chat_max_tokens)
    tool_use = tool_use_from_pb(request)
    if tool_use is not None:
        template = dataclasses.replace(template, tools=tool_use.shown)
        if tool_use.is_forced:  # the calls are guaranteed: decoding follows their schema
            if sampling.structured is not None:
                raise invalid_argument(f"{sampling.structured.describe()} and tool_choice "
                                       f"{tool_use.named or tool_use.mode!r} both constrain the answer: set only one")
            sampling = dataclasses.replace(sampling, structured=Constraint("json_schema", tool_use.forced_schema(),
                                                                           "tools"))
    return GenerationCall("chat", model, (), messages, sampling, _n(request, cfg), _user(request.user, cfg),
                          _priority(request.priority), request.skip_cache,
                          template=template if template.is_set else None, tool_use=tool_use)


def _input_ids(request, cfg: GatewayConfig) -> tuple[tuple[int, ...], ...]:
    """Embedding inputs as token ids (checked against the vocabulary by the pipeline, which knows the version)."""
    if request.input or request.inputs:
        raise invalid_argument("set one of input, inputs and input_token_ids, not several")
    return _token_id_lists(request.input_token_ids, "input_token_ids", "inputs", "input", cfg.max_embedding_inputs)


def embeddings_from_pb(request: pb.CreateEmbeddingsRequest, cfg: GatewayConfig) -> EmbeddingCall:
    model = _model(request.model, cfg)
    inputs: tuple[str, ...] = ()
    if request.input_token_ids:
        prompt_ids = _input_ids(request, cfg)
    else:
        prompt_ids, inputs = (), _one_or_many(request, "input", "inputs", cfg.max_embedding_inputs)
    if request.encoding_format not in ("", "float", "base64"):
        raise invalid_argument(f"encoding_format={_shown(request.encoding_format)} is not supported; use \"float\" "
                               "or \"base64\"")
    dimensions = request.dimensions.value if request.HasField("dimensions") else None
    if dimensions is not None and dimensions < 1:
        raise invalid_argument(f"dimensions={dimensions} is out of range: it must be >= 1")
    return EmbeddingCall(model, inputs, _user(request.user, cfg), _priority(request.priority), request.skip_cache,
                         prompt_ids=prompt_ids, encoding_format=request.encoding_format or "float",
                         dimensions=dimensions)
