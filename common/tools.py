"""Tool calling, written once for the gateway (exact token counts, parsing the answer) and the worker (templating).

Templating. A chat template that renders tools itself (its source names `tools`, as Qwen2.5's, Llama 3.1's and
Hermes' do) gets them through transformers' apply_chat_template(tools=...), and the conversation's tool calls and
tool results in Hugging Face's shape (assistant `tool_calls` with arguments as an object, `tool` messages with
`tool_call_id`). A template that does not (SmolLM2-135M-Instruct's) gets the Hermes-style fallback, plain messages
any template renders:
- the tools, one JSON object per line inside <tools></tools>, and the calling convention, in the system message
  (appended to the first message when it is the system's, else a system message of its own in front);
- an assistant message's calls as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` after its text;
- `tool` messages as a user message `<tool_response>\n...\n</tool_response>` (consecutive ones in one message).

Answers. With tool_choice "auto" the model's text is parsed for those <tool_call> blocks (whatever the template:
Hermes' format is the only one parsed); a block that is not a JSON object naming one of the request's tools with
object arguments stays content, as it was written. With "required" or a named function, decoding is constrained to
JSON (forced_schema): {"name": <a tool's name>, "arguments": <its parameters>}, a list of such objects when
parallel tool calls are allowed under "required"; the parser then streams each call's arguments as they are
generated. Objects of a parameters schema that do not say otherwise are closed to their listed properties (a small
model otherwise adds arguments it reads in the schema), and a schema's keys are sorted (protobuf's Struct keeps no
order), so a forced call writes its arguments in alphabetical order. Unary responses run the same parser over the
whole text, so a stream and its unary twin agree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
import typing

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
ARGUMENT_SEPARATORS = (", ", ": ")  # json.dumps' defaults, as OpenAI writes arguments
_ID_ALPHABET = string.ascii_letters + string.digits
_TOOLS_IN_TEMPLATE = re.compile(r"\btools\b")

FALLBACK_PREAMBLE = (
    "# Tools\n\n"
    "You can call functions to help with the user's request. Their signatures, as JSON Schema, are inside "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>")


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; parameters is its JSON Schema as canonical JSON text ("" for none)."""

    name: str
    description: str = ""
    parameters: str = ""

    def schema(self) -> dict:
        return json.loads(self.parameters) if self.parameters else {"type": "object", "properties": {}}

    def openai(self) -> dict:
        """{"type": "function", "function": {...}}: what chat templates (and OpenAI's API) read."""
        function: dict[str, typing.Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.schema()
        return {"type": "function", "function": function}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call in a conversation (an earlier assistant turn, or an answer): arguments as JSON text."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _arguments_value(arguments: str) -> typing.Any:
    """The arguments as an object when they parse as one (templates write them with tojson), else the text."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


# ---- protobuf <-> records (the gateway's requests, the worker's tasks) ----

def _integral(value: typing.Any) -> typing.Any:
    """JSON numbers that protobuf's Struct turned into floats (2.0) back to integers: a schema's minItems is 2."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def canonical_json(value: typing.Any) -> str:
    """Keys sorted: a Struct's map has no order on the wire (nor through the REST sidecar's Go maps), so the
    prompt, the constraint and the cache key must not depend on one; a forced call's arguments follow it too."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=ARGUMENT_SEPARATORS)


def _plain(value) -> typing.Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        return _integral(value.number_value)
    return None if kind in (None, "null_value") else getattr(value, kind)


def struct_value(struct) -> dict:
    """A google.protobuf.Struct as plain JSON data (numbers that are not finite stay floats: callers check them;
    json_format refuses to convert them at all)."""
    return {k: _plain(v) for k, v in struct.fields.items()}


def spec_from_pb(tool) -> ToolSpec:
    """An inference.v1.Tool as a record (parameters as canonical JSON text, "" when absent)."""
    function = tool.function
    parameters = canonical_json(struct_value(function.parameters)) if function.HasField("parameters") else ""
    return ToolSpec(function.name, function.description, parameters)


def spec_to_pb(spec: ToolSpec):
    from llmserve.inference.v1 import inference_pb2 as pb

    tool = pb.Tool(type="function", function=pb.FunctionDefinition(name=spec.name, description=spec.description))
    if spec.parameters:
        tool.function.parameters.update(json.loads(spec.parameters))
    return tool


def call_to_pb(call: ToolCall):
    from llmserve.inference.v1 import inference_pb2 as pb

    return pb.ToolCall(id=call.id, type="function", function=pb.FunctionCall(name=call.name, arguments=call.arguments))


def message_from_pb(message) -> dict:
    """An inference.v1.ChatMessage as the chat template reads it: role, content, name when given, and the tool
    fields when set (tool_calls as ToolCall records, for template_inputs)."""
    out: dict[str, typing.Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


# ---- templating ----

def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself (its source uses a `tools` variable)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or "tool_use" when present
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and bool(_TOOLS_IN_TEMPLATE.search(template))


def fallback_preamble(tools: typing.Sequence[ToolSpec]) -> str:
    return FALLBACK_PREAMBLE.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))


def _call_text(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": _arguments_value(call.arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def fallback_conversation(messages: list[dict], tools: typing.Sequence[ToolSpec]) -> list[dict]:
    """The conversation with tools, tool calls and tool results as plain text (see the module docstring)."""
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        extra = {"name": message["name"]} if message.get("name") else {}
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in message["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls, **extra})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            out.append({"role": role, "content": content, **extra})
    for message in out:
        message.pop("_tool_responses", None)
    if tools:
        preamble = fallback_preamble(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}" if out[0]["content"] else preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def native_conversation(messages: list[dict]) -> list[dict]:
    """Messages in Hugging Face's tool shape: calls as {id, type, function: {name, arguments (an object)}}."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name,
                                                              "arguments": _arguments_value(c.arguments)}}
                for c in message["tool_calls"]]}
        out.append(message)
    return out


def template_inputs(tokenizer, messages: list[dict], tools: typing.Sequence[ToolSpec]
                    ) -> tuple[list[dict], list[dict] | None]:
    """(conversation, tools argument) for apply_chat_template: the template's own tool rendering when it has one,
    else the fallback (tools None). Messages carry `tool_calls` (ToolCall records) and `tool_call_id` keys."""
    if template_renders_tools(tokenizer):
        return native_conversation(messages), [t.openai() for t in tools] or None
    return fallback_conversation(messages, tools), None


def has_tool_content(messages: typing.Iterable[dict]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def chat_ids(tokenizer, messages: list[dict], tools: typing.Sequence[ToolSpec] = (), *,
             add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
    """A conversation's token ids with its tools, tool calls and tool results templated as above; without any, the
    plain chat template (tokenizers.chat_prompt_ids). The gateway's count and the worker's prompt both come from
    here, so they agree to the token."""
    from llmserve.common.tokenizers import chat_prompt_ids

    tools_arg = None
    if tools or has_tool_content(messages):
        messages, tools_arg = template_inputs(tokenizer, messages, tools)
    return chat_prompt_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, tools=tools_arg)


# ---- constrained decoding for "required" and named choices ----

def _closed(schema: typing.Any) -> typing.Any:
    """The schema with objects that do not say otherwise closed to their listed properties (additionalProperties
    false, as OpenAI's strict mode requires): what it admits still validates against the original, and a small model
    cannot wander off into arguments nobody asked for (SmolLM2 adds a "description" it reads in the schema)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
        if out.get("type") == "object" and "additionalProperties" not in out and "patternProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = _closed(out["items"])
    return out


def call_schema(tool: ToolSpec) -> dict:
    """One call of `tool`, name first (the grammar engine writes properties in the schema's order)."""
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": _closed(tool.schema())},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_schema(tools: typing.Sequence[ToolSpec], named: str = "", parallel: bool = True) -> dict:
    """The JSON Schema an answer must match: one call of the named function; or, for "required", one call of any
    tool, or (parallel) a non-empty list of calls."""
    if named:
        return call_schema(next(t for t in tools if t.name == named))
    one = call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [call_schema(t) for t in tools]}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


# ---- parsing answers ----

@dataclasses.dataclass
class CallDelta:
    """A piece of a tool call: the first of a call has id and name (arguments ""), later ones more arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


Event = str | CallDelta  # content text, or a piece of a call

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag (so it is held back until the next text decides)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallParser:
    """Turns a choice's text, fed in deltas, into content and tool-call events.

    forced: the output is constrained JSON (forced_schema): one call, or a list of calls when `array`; arguments
    stream as generated. Otherwise ("auto") <tool_call> blocks are parsed when they close; `names` are the tools
    a block may call; `parallel` false keeps the first call only.
    """

    def __init__(self, names: typing.Iterable[str], *, forced: bool = False, array: bool = False,
                 parallel: bool = True):
        self.names, self.forced, self.array, self.parallel = frozenset(names), forced, array, parallel
        self.buf = ""
        self.num_calls = 0  # calls begun
        self._ws = ""  # trailing whitespace of content, held back (dropped before a call and after the last one)
        self._after_call = False
        self._searched = 0  # auto: where the search for the open block's end resumes
        # forced: "start" -> ("head" -> "args" -> "tail")+ -> "done"
        self._state = "start" if forced else "content"
        self._depth, self._in_string, self._escape = 0, False, False

    @property
    def has_calls(self) -> bool:
        """Whether a call began (a forced call cut by max_tokens counts: its arguments are then incomplete)."""
        return self.num_calls > 0

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._forced() if self.forced else self._auto(final=False)

    def finish(self) -> list[Event]:
        """Whatever is left once the choice ended (an unfinished block stays content)."""
        events = [] if self.forced else self._auto(final=True)
        if self.forced and not self.has_calls and self.buf.strip():
            events.append(self.buf)  # cut off (max_tokens) before a call began: the text as it is
        self.buf = ""  # else at most the unfinished head of a further call: nothing usable
        if self._ws and not self.has_calls:
            events.append(self._ws)
        self._ws = ""
        return [e for e in events if not isinstance(e, str) or e]

    # ---- "auto": <tool_call> blocks ----

    def _content(self, text: str) -> list[Event]:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return []
            self._after_call = False
        text = self._ws + text
        stripped = text.rstrip()
        self._ws = text[len(stripped):]
        return [stripped] if stripped else []

    def _auto(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._state == "content":
                start = self.buf.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self.buf, TOOL_CALL_OPEN)
                    events += self._content(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                events += self._content(self.buf[:start])
                self.buf = self.buf[start + len(TOOL_CALL_OPEN):]
                self._state, self._searched = "block", 0
            else:
                end = self.buf.find(TOOL_CALL_CLOSE, self._searched)
                if end < 0:
                    # A long block is searched once, not again from its start at every delta.
                    self._searched = max(0, len(self.buf) - len(TOOL_CALL_CLOSE) + 1)
                    if final:  # an unclosed block: the text as written
                        events += self._content(TOOL_CALL_OPEN + self.buf)
                        self.buf, self._state = "", "content"
                    return events
                block, self.buf = self.buf[:end], self.buf[end + len(TOOL_CALL_CLOSE):]
                self._state = "content"
                call = self._parse_block(block)
                if call is None:  # malformed: content, as written
                    self._after_call = False
                    events += self._content(TOOL_CALL_OPEN + block + TOOL_CALL_CLOSE)
                    continue
                self._ws = ""
                self._after_call = True
                if self.parallel or not self.num_calls:
                    name, arguments = call
                    events += [CallDelta(self.num_calls, new_call_id(), name), CallDelta(self.num_calls,
                                                                                       arguments=arguments)]
                    self.num_calls += 1

    def _parse_block(self, block: str) -> tuple[str, str] | None:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return value["name"], json.dumps(arguments, ensure_ascii=False, separators=ARGUMENT_SEPARATORS)

    # ---- forced: constrained JSON ----

    def _forced(self) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._state == "start":
                text = self.buf.lstrip()
                if not text:
                    return events
                if self.array:
                    if not text.startswith("["):
                        return events
                    text = text[1:]
                self.buf, self._state = text, "head"
            elif self._state == "head":
                match = _HEAD.match(self.buf)
                if match is None:
                    return events
                try:
                    name = json.loads(f'"{match.group(1)}"')
                except ValueError:
                    name = match.group(1)
                events.append(CallDelta(self.num_calls, new_call_id(), name))
                self.num_calls += 1
                self.buf, self._state = self.buf[match.end():], "args"
                self._depth, self._in_string, self._escape = 0, False, False
            elif self._state == "args":
                if self._depth == 0:  # the value has not begun: what comes before it is not part of it
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        return events
                end, closed = self._scan_value()
                if self.buf[:end]:
                    events.append(CallDelta(self.num_calls - 1, arguments=self.buf[:end]))
                self.buf = self.buf[end:]
                if not closed:
                    return events
                self._state = "tail"
            elif self._state == "tail":  # the call's closing brace, then a comma, the list's end, or nothing
                text = self.buf.lstrip()
                if not text:
                    self.buf = ""
                    return events
                if text[0] == "}":
                    text = text[1:].lstrip()
                    if not text:
                        self.buf = ""
                        return events
                if self.array and text[0] == ",":
                    self.buf, self._state = text[1:], "head"
                else:
                    self.buf, self._state = "", "done"
            else:  # done: the grammar allows nothing after the value
                self.buf = ""
                return events

    def _scan_value(self) -> tuple[int, bool]:
        """(how much of buf belongs to the arguments object, whether it closed there)."""
        for i, ch in enumerate(self.buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1, True
        return len(self.buf), False


@dataclasses.dataclass
class ParsedAnswer:
    content: str
    calls: list[ToolCall]


def collect(events: typing.Iterable[Event]) -> ParsedAnswer:
    """Events merged into the content and the complete calls (what a unary response carries)."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for event in events:
        if isinstance(event, str):
            content.append(event)
            continue
        if event.id:
            heads[event.index] = (event.id, event.name)
        calls.setdefault(event.index, []).append(event.arguments)
    return ParsedAnswer("".join(content), [ToolCall(heads[i][0], heads[i][1], "".join(calls[i]))
                                           for i in sorted(heads)])


def parse_answer(text: str, parser: ToolCallParser) -> ParsedAnswer:
    return collect([*parser.feed(text), *parser.finish()])


def finish_reason(reason: str, has_calls: bool) -> str:
    """OpenAI's "tool_calls" when the answer ended normally with calls; "length" stays (a call may be cut)."""
    return "tool_calls" if has_calls and reason == "stop" else reason
