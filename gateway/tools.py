"""Tool calling at the gateway: a chat request's tools, tool_choice, parallel_tool_calls and the tool fields of its
messages -> validated records (from_pb, with messages naming the field), and each choice's text -> message
tool_calls or stream deltas (common/tools.py parses; this module shapes the protobuf).

tool_choice semantics (as OpenAI's, with vLLM's reading of "none"):
- "auto" (the default with tools): the tools are in the prompt; the answer is parsed for <tool_call> blocks.
- "required" / a named function: the tools (all of them) are in the prompt and decoding is constrained to
  common/tools.forced_schema, so the calls parse and their arguments validate against the function's schema.
- "none" (the default without tools): the tools are checked but not shown to the model, and the answer is text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing

from llmserve.common import tools as t
from llmserve.common.errors import invalid_argument
from llmserve.inference.v1 import inference_pb2 as pb

MAX_TOOLS = 128  # as OpenAI's API
MAX_TOOL_CALLS = 128  # calls in one assistant message of a request
MAX_PARAMETERS_CHARS = 64 * 1024  # one function's parameters schema, as JSON text (the grammar engine's bound)
MAX_DESCRIPTION_CHARS = 4096
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MODES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """The request's tools and what tool_choice asks."""

    tools: tuple[t.ToolSpec, ...]
    mode: str  # "none", "auto", "required" or "named"
    named: str = ""  # mode "named": the function
    parallel: bool = True

    @property
    def shown(self) -> tuple[t.ToolSpec, ...]:
        """The tools the chat template receives."""
        return () if self.mode == "none" else self.tools

    @property
    def is_forced(self) -> bool:
        return self.mode in ("required", "named")

    def forced_schema(self) -> str:
        """JSON text of the schema constrained decoding follows (required / named only)."""
        return json.dumps(t.forced_schema(self.tools, self.named, self.parallel), ensure_ascii=False)

    def parser(self) -> t.ToolCallParser | None:
        """A fresh parser for one choice's answer; None when the answer is plain text."""
        if self.mode == "none" or not self.tools:
            return None
        return t.ToolCallParser([s.name for s in self.tools], forced=self.is_forced,
                                array=self.mode == "required" and self.parallel, parallel=self.parallel)

    def cache_fields(self) -> dict:
        return {"tools": [dataclasses.astuple(s) for s in self.tools], "mode": self.mode, "named": self.named,
                "parallel": self.parallel}

    @property
    def num_bytes(self) -> int:
        """What the tools add to the prompt, at least (for the gateway's bytes-per-token bound)."""
        return sum(len(s.name) + len(s.description.encode()) + len(s.parameters.encode()) for s in self.shown)


def _check_schema(field: str, schema: typing.Any) -> None:
    """A function's parameters: a JSON Schema of an object, as OpenAI requires."""
    if not isinstance(schema, dict):
        raise invalid_argument(f"{field} must be a JSON Schema object, not {type(schema).__name__}")
    kind = schema.get("type", "object")
    if kind != "object":
        raise invalid_argument(f"{field}.type is {json.dumps(kind)[:40]}; a function's parameters are an object: "
                               "use \"type\": \"object\" with its arguments under \"properties\"")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, (dict, bool)) for v in properties.values()):
        raise invalid_argument(f"{field}.properties must be an object mapping each argument to its schema")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise invalid_argument(f"{field}.required must be a list of argument names")


def _check_compiles(field: str, parameters: str) -> None:
    """The schema converts to a grammar (checked without a vocabulary, about 0.1 ms): a forced call's constraint
    is refused here, naming the function, rather than by the worker."""
    import llguidance

    from llmserve.common.structured import Constraint, ConstraintError, grammar_of

    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_of(Constraint("json_schema", parameters)))
    except (ConstraintError, ValueError, TypeError) as exc:
        error = str(exc)
    if error:
        text = " | ".join(line.strip() for line in error.splitlines() if line.strip())
        raise invalid_argument(f"{field} cannot constrain decoding (tool_choice required or named): "
                               f"{text[:300]}")


def _tools(request) -> tuple[t.ToolSpec, ...]:
    if len(request.tools) > MAX_TOOLS:  # counted before anything iterates them
        raise invalid_argument(f"tools has {len(request.tools)} entries; at most {MAX_TOOLS} are allowed")
    specs: list[t.ToolSpec] = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(request.tools):
        field = f"tools[{i}]"
        if tool.type not in ("", "function"):
            raise invalid_argument(f"{field}.type={json.dumps(tool.type)[:40]} is not supported; the only tool type "
                                   "is \"function\"")
        name = tool.function.name
        if not name:
            raise invalid_argument(f"{field}.function.name is required")
        if not NAME.fullmatch(name):
            raise invalid_argument(f"{field}.function.name={json.dumps(name)[:80]} is invalid: use 1-64 characters "
                                   "of a-z, A-Z, 0-9, _ and -")
        if name in seen:
            raise invalid_argument(f"{field}.function.name {name!r} is already the name of tools[{seen[name]}]: "
                                   "function names must be unique")
        seen[name] = i
        if len(tool.function.description) > MAX_DESCRIPTION_CHARS:
            raise invalid_argument(f"{field}.function.description is {len(tool.function.description)} characters; "
                                   f"at most {MAX_DESCRIPTION_CHARS} are allowed")
        if tool.function.HasField("parameters"):
            schema = t.struct_value(tool.function.parameters)
            _check_schema(f"{field}.function.parameters", schema)
            try:
                json.dumps(schema, allow_nan=False)
            except ValueError:
                raise invalid_argument(f"{field}.function.parameters has a number that is not finite (NaN or "
                                       "Infinity), which JSON cannot hold") from None
        spec = t.spec_from_pb(tool)
        if len(spec.parameters) > MAX_PARAMETERS_CHARS:
            raise invalid_argument(f"{field}.function.parameters is {len(spec.parameters)} characters of JSON; at "
                                   f"most {MAX_PARAMETERS_CHARS} are allowed")
        specs.append(spec)
    return tuple(specs)


def tool_use_from_pb(request) -> ToolUse | None:
    """The request's tools and tool_choice; None when it has neither (a plain chat request)."""
    specs = _tools(request)
    has_choice = request.HasField("tool_choice")
    # Tokenize counts a chat request's tools: it has no parallel_tool_calls (nothing to parse).
    has_parallel = "parallel_tool_calls" in request.DESCRIPTOR.fields_by_name and request.HasField(
        "parallel_tool_calls")
    choice = request.tool_choice
    if not specs:
        if has_choice and (choice.type or choice.mode not in ("", "none")):
            shown = choice.mode or f"function {choice.function.name!r}"
            raise invalid_argument(f"tool_choice {shown} needs tools: send the functions in tools, or leave "
                                   "tool_choice out")
        if has_parallel:
            raise invalid_argument("parallel_tool_calls is only allowed with tools")
        return None
    parallel = request.parallel_tool_calls.value if has_parallel else True
    names = ", ".join(s.name for s in specs[:8]) + (", ..." if len(specs) > 8 else "")
    if choice.type:
        if choice.type != "function":
            raise invalid_argument(f"tool_choice.type={json.dumps(choice.type)[:40]} is not supported; use "
                                   "\"function\" with function.name, or mode none, auto or required")
        if choice.mode:
            raise invalid_argument("set either tool_choice.mode or tool_choice.type \"function\", not both")
        name = choice.function.name
        if not name:
            raise invalid_argument("tool_choice.function.name is required with tool_choice.type \"function\"")
        index = next((i for i, s in enumerate(specs) if s.name == name), None)
        if index is None:
            raise invalid_argument(f"tool_choice names function {json.dumps(name)[:80]}, which is not among the "
                                   f"tools ({names})")
        _check_compiles(f"tools[{index}].function.parameters", specs[index].parameters or "{}")
        return ToolUse(specs, "named", name, parallel)
    if choice.HasField("function"):
        raise invalid_argument("tool_choice.function is set but tool_choice.type is not \"function\": set type "
                               "\"function\" to call it, or leave function out")
    mode = choice.mode or "auto"
    if mode not in MODES:
        raise invalid_argument(f"tool_choice={json.dumps(mode)[:40]} is invalid; use none, auto, required or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if mode == "required":
        for i, spec in enumerate(specs):
            _check_compiles(f"tools[{i}].function.parameters", spec.parameters or "{}")
    return ToolUse(specs, mode, "", parallel)


@dataclasses.dataclass(frozen=True)
class MessageTools:
    """The tool fields of a conversation, per message (empty tuples when no message has any)."""

    tool_calls: tuple[tuple[t.ToolCall, ...], ...] = ()
    tool_call_ids: tuple[str, ...] = ()


def message_tools_from_pb(messages) -> MessageTools:
    """Checks the tool fields of the messages: calls only in assistant messages, each with an id and a function
    name; every tool message answers a call of the assistant message before it (and its tool messages)."""
    if not any(m.tool_calls or m.tool_call_id or m.role == "tool" for m in messages):
        return MessageTools()
    calls: list[tuple[t.ToolCall, ...]] = []
    open_ids: set[str] = set()  # ids of the latest assistant message's calls
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if message.tool_calls and message.role != "assistant":
            raise invalid_argument(f"{field}.tool_calls is only allowed in assistant messages; this one is "
                                   f"{message.role!r}")
        if len(message.tool_calls) > MAX_TOOL_CALLS:
            raise invalid_argument(f"{field}.tool_calls has {len(message.tool_calls)} entries; at most "
                                   f"{MAX_TOOL_CALLS} are allowed")
        if message.role == "tool":
            if not message.tool_call_id:
                raise invalid_argument(f"{field} has role \"tool\" but no tool_call_id: set it to the id of the "
                                       "assistant's tool call this message answers")
            if message.tool_call_id not in open_ids:
                raise invalid_argument(f"{field}.tool_call_id={json.dumps(message.tool_call_id)[:80]} answers no "
                                       "tool call: a tool message must follow the assistant message whose "
                                       "tool_calls has that id")
        elif message.tool_call_id:
            raise invalid_argument(f"{field}.tool_call_id is only allowed in tool messages; this one is "
                                   f"{message.role!r}")
        else:  # any other message closes the calls before it; an assistant's opens its own
            open_ids = set()
        parsed = []
        for j, call in enumerate(message.tool_calls):
            where = f"{field}.tool_calls[{j}]"
            if call.type not in ("", "function"):
                raise invalid_argument(f"{where}.type={json.dumps(call.type)[:40]} is not supported; use "
                                       "\"function\"")
            if not call.id:
                raise invalid_argument(f"{where}.id is required (tool messages answer a call by its id)")
            if not call.function.name:
                raise invalid_argument(f"{where}.function.name is required")
            open_ids.add(call.id)
            parsed.append(t.ToolCall(call.id, call.function.name, call.function.arguments))
        calls.append(tuple(parsed))
    return MessageTools(tuple(calls), tuple(m.tool_call_id for m in messages))


# ---- responses ----

def answer_message(text: str, reason: str, tool_use: ToolUse | None) -> tuple[pb.ChatMessage, str]:
    """A unary choice's message and finish_reason: the text, or its tool calls (and any text beside them)."""
    parser = tool_use.parser() if tool_use is not None else None
    if parser is None:
        return pb.ChatMessage(role="assistant", content=text), reason
    parsed = t.parse_answer(text, parser)
    message = pb.ChatMessage(role="assistant", content=parsed.content,
                             tool_calls=[t.call_to_pb(c) for c in parsed.calls])
    return message, t.finish_reason(reason, parser.has_calls)


class StreamTools:
    """One parser per choice of a stream: text deltas in, (content, tool-call deltas) out."""

    def __init__(self, tool_use: ToolUse | None, num_choices: int):
        self.parsers = [tool_use.parser() if tool_use is not None else None for _ in range(num_choices)]

    @property
    def is_active(self) -> bool:
        return any(p is not None for p in self.parsers)

    def delta(self, index: int, text: str, reason: str) -> tuple[str, list[pb.ToolCallDelta], str]:
        """(content, tool-call deltas, finish_reason) of a choice's delta; the last one (reason set) flushes."""
        parser = self.parsers[index]
        if parser is None:
            return text, [], reason
        events = parser.feed(text) if text else []
        if reason:
            events += parser.finish()
        content = "".join(e for e in events if isinstance(e, str))
        deltas = [pb.ToolCallDelta(index=e.index, id=e.id, type="function" if e.id else "",
                                   function=pb.FunctionCall(name=e.name, arguments=e.arguments))
                  for e in events if isinstance(e, t.CallDelta)]
        return content, deltas, t.finish_reason(reason, parser.has_calls) if reason else ""
