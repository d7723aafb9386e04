"""Tool calling over gRPC and over REST (the official `openai` SDK through the sidecar), against one in-process mesh:
the real SmolLM2-135M-Instruct where the text matters (its template does not render tools: the Hermes-style
fallback of common/tools.py does), the tiny Llama with SmolLM2's tokenizer for the rest.

tool_choice required / named: decoding is constrained, so the calls parse and validate against the schema whatever
the model. auto: a 135M model does not call tools by itself, so the auto tests force the model's text with a choice
constraint (structured_outputs.choice) and check how the answer is parsed: calls, content, malformed blocks.
"""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2
from google.protobuf import wrappers_pb2 as w

from llmserve.common import tools as t
from llmserve.inference.v1 import inference_pb2 as pb
from tests import test_openai_surface as surface
from tests.helpers.mesh import generate_version, start_mesh
from tests.helpers.tiny_models import SMOLLM2_SOURCE, smollm2_tokenizer

openai = pytest.importorskip("openai", reason="the openai SDK is part of the dev extra (pip install -e '.[dev]')")

# The REST sidecar in front of this module's mesh, and the raw HTTP helpers, as test_openai_surface has them.
sidecar_binary, rest, client = surface.sidecar_binary, surface.rest, surface.client
raw_http, sse = surface.raw_http, surface.sse

SMOL = "smollm2-tools-v1"
TINY = "tiny-tools-v1"
WORKER_TEMPLATED = "tiny-tools-worker-templated-v1"

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "description": "The city, e.g. Paris"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS_JSON = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                "parameters": WEATHER}},
              {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                                "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = "What is the weather in Paris, in celsius?"


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    # The gateway cannot load this version's tokenizer: the worker templates the tools itself, and must count the
    # same prompt tokens as the gateway does for the same weights.
    worker_templated = generate_version(WORKER_TEMPLATED, f"file:{tiny_llama_dir}", context_length=2048)
    worker_templated.labels["tokenizer_source"] = "file:/nonexistent/tokenizer"
    config = make_config()
    config.worker.lease_ttl_s = 10  # the real model's steps on a loaded 2-core machine must not lose the lease
    mesh = await start_mesh(config, versions=[
        generate_version(SMOL, SMOLLM2_SOURCE, context_length=2048),
        generate_version(TINY, f"file:{tiny_llama_dir}", context_length=2048), worker_templated],
        aliases={"smol": [(SMOL, 1)], "tiny": [(TINY, 1)]}, worker_models=[[SMOL, TINY, WORKER_TEMPLATED]])
    yield mesh
    await mesh.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def tools_pb(tools=TOOLS_JSON) -> list[pb.Tool]:
    out = []
    for tool in tools:
        params = struct_pb2.Struct()
        params.update(tool["function"]["parameters"])
        out.append(pb.Tool(type="function", function=pb.FunctionDefinition(
            name=tool["function"]["name"], description=tool["function"]["description"], parameters=params)))
    return out


def named(name: str) -> pb.ToolChoice:
    return pb.ToolChoice(type="function", function=pb.ToolChoiceFunction(name=name))


def chat(cls=pb.CreateChatCompletionRequest, **kw):
    fields = dict(model="smol", messages=[pb.ChatMessage(role="user", content=QUESTION)], tools=tools_pb(),
                  max_tokens=w.Int32Value(value=64), temperature=w.FloatValue(value=0.0))
    fields.update(kw)
    return cls(**fields)


def assert_valid_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


# ---- gRPC: constrained choices ----

async def test_named_tool_choice_calls_that_function_with_valid_arguments(mesh):
    answer = await mesh.stub.CreateChatCompletion(chat(tool_choice=named("get_weather")), metadata=mesh.auth)
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    (call,) = choice.message.tool_calls
    arguments = assert_valid_call(call, ("get_weather",))
    assert arguments["unit"] in ("celsius", "fahrenheit")
    print("SmolLM2 named call:", call.function.arguments)


@pytest.mark.parametrize("parallel", [True, False])
async def test_required_tool_choice_gives_at_least_one_valid_call(mesh, parallel):
    answer = await mesh.stub.CreateChatCompletion(chat(
        tool_choice=pb.ToolChoice(mode="required"), parallel_tool_calls=w.BoolValue(value=parallel),
        max_tokens=w.Int32Value(value=160)), metadata=mesh.auth)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
        for call in choice.message.tool_calls:
            assert_valid_call(call)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        print(f"SmolLM2 required (parallel={parallel}):", [c.function.arguments for c in choice.message.tool_calls])


async def test_a_forced_call_streams_as_openai_deltas_equal_to_the_unary_answer(mesh):
    request = chat(tool_choice=named("get_weather"), skip_cache=True)
    unary = (await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)).choices[0].message.tool_calls[0]
    for attempt in ("live", "cache"):
        stream = chat(pb.StreamChatCompletionRequest, tool_choice=named("get_weather"), skip_cache=attempt == "live")
        chunks = [c async for c in mesh.stub.StreamChatCompletion(stream, metadata=mesh.auth)]
        deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls]
        first, rest_ = deltas[0], deltas[1:]
        assert (first.index, first.type, first.function.name, first.function.arguments) == (
            0, "function", "get_weather", "") and first.id.startswith("call_")
        assert all(d.index == 0 and not d.id and not d.type and not d.function.name for d in rest_)
        assert len(rest_) > 1, "the arguments arrive in pieces"
        assert "".join(d.function.arguments for d in rest_) == unary.function.arguments
        reasons = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert reasons == ["tool_calls"]
        assert not "".join(ch.delta.content for c in chunks for ch in c.choices)


async def test_tool_choice_none_keeps_the_tools_out_of_the_prompt_and_answers_in_text(mesh):
    plain = await mesh.stub.CreateChatCompletion(chat(tools=[], max_tokens=w.Int32Value(value=8)),
                                                 metadata=mesh.auth)
    none = await mesh.stub.CreateChatCompletion(chat(tool_choice=pb.ToolChoice(mode="none"),
                                                     max_tokens=w.Int32Value(value=8)), metadata=mesh.auth)
    auto = await mesh.stub.CreateChatCompletion(chat(max_tokens=w.Int32Value(value=8)), metadata=mesh.auth)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason == "length"


# ---- gRPC: auto, the model's own format ----

HERMES = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>')


def forced_text(text: str) -> pb.StructuredOutputs:
    """The model's answer forced to `text` (how the auto tests give a tiny model a tool-call format)."""
    return pb.StructuredOutputs(choice=[text])


@pytest.mark.parametrize("parallel", [True, False])
async def test_auto_parses_hermes_tool_call_blocks(mesh, parallel):
    request = chat(model="tiny", structured_outputs=forced_text(HERMES), max_tokens=w.Int32Value(value=200),
                   parallel_tool_calls=w.BoolValue(value=parallel))
    answer = await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == (["get_weather", "get_time"] if parallel else ["get_weather"])
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    stream = chat(pb.StreamChatCompletionRequest, model="tiny", structured_outputs=forced_text(HERMES),
                  max_tokens=w.Int32Value(value=200), parallel_tool_calls=w.BoolValue(value=parallel))
    chunks = [c async for c in mesh.stub.StreamChatCompletion(stream, metadata=mesh.auth)]
    content = "".join(ch.delta.content for c in chunks for ch in c.choices)
    assert content == "I will check." and "<tool" not in content
    deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls]
    names = [d.function.name for d in deltas if d.id]
    assert names == [c.function.name for c in calls]
    for k, call in enumerate(calls):
        assert "".join(d.function.arguments for d in deltas if d.index == k) == call.function.arguments


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # not JSON
    '<tool_call>\n{"name": "send_email", "arguments": {}}\n</tool_call>',  # not a tool of the request
    "The weather is fine <tool_call",  # a half tag at the end
], ids=["malformed", "unknown tool", "half tag"])
async def test_auto_leaves_a_malformed_call_as_content(mesh, text):
    answer = await mesh.stub.CreateChatCompletion(chat(model="tiny", structured_outputs=forced_text(text),
                                                       max_tokens=w.Int32Value(value=100)), metadata=mesh.auth)
    (choice,) = answer.choices
    assert choice.message.content == text and not choice.message.tool_calls and choice.finish_reason == "stop"
    stream = chat(pb.StreamChatCompletionRequest, model="tiny", structured_outputs=forced_text(text),
                  max_tokens=w.Int32Value(value=100))
    chunks = [c async for c in mesh.stub.StreamChatCompletion(stream, metadata=mesh.auth)]
    assert "".join(ch.delta.content for c in chunks for ch in c.choices) == text


# ---- the next turn: tool calls and results in the template ----

def round_trip_messages() -> list[pb.ChatMessage]:
    call = pb.ToolCall(id="call_abc", type="function", function=pb.FunctionCall(
        name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}'))
    return [pb.ChatMessage(role="user", content=QUESTION),
            pb.ChatMessage(role="assistant", content="", tool_calls=[call]),
            pb.ChatMessage(role="tool", content='{"temperature": 21, "sky": "clear"}', tool_call_id="call_abc")]


async def test_tool_results_round_trip_into_the_next_turn(mesh, tokenizer):
    messages = round_trip_messages()
    expected = t.chat_ids(tokenizer, [t.message_from_pb(m) for m in messages],
                          [t.spec_from_pb(x) for x in tools_pb()])
    text = tokenizer.decode(expected)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in text and "<tool_response>\n{\"temperature\": 21, \"sky\": \"clear\"}\n</tool_response>" in text
    answer = await mesh.stub.CreateChatCompletion(chat(messages=messages, max_tokens=w.Int32Value(value=40)),
                                                  metadata=mesh.auth)
    assert answer.usage.prompt_tokens == len(expected)
    print("SmolLM2 after the tool result:", answer.choices[0].message.content)
    assert answer.choices[0].message.content
    # The worker templating it itself (no tokenizer at the gateway for this version) counts the same.
    for model in ("tiny", WORKER_TEMPLATED):
        small = await mesh.stub.CreateChatCompletion(chat(model=model, messages=messages, skip_cache=True,
                                                          max_tokens=w.Int32Value(value=2)), metadata=mesh.auth)
        assert small.usage.prompt_tokens == len(expected), model


async def test_tokenize_counts_the_tools_as_a_chat_request_is_charged(mesh, rest):
    messages = round_trip_messages()
    answer = await mesh.stub.CreateChatCompletion(chat(model="tiny", messages=messages, skip_cache=True,
                                                       max_tokens=w.Int32Value(value=1)), metadata=mesh.auth)
    counted = await mesh.stub.Tokenize(pb.TokenizeRequest(model="tiny", messages=messages, tools=tools_pb()),
                                       metadata=mesh.auth)
    without = await mesh.stub.Tokenize(pb.TokenizeRequest(model="tiny", messages=messages, tools=tools_pb(),
                                                          tool_choice=pb.ToolChoice(mode="none")), metadata=mesh.auth)
    assert counted.count == answer.usage.prompt_tokens > without.count
    status, raw = await raw_http(rest, "POST", "/tokenize", {
        "model": "tiny", "tools": TOOLS_JSON, "tool_choice": "auto", "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21, "sky": "clear"}'}]},
        mesh.api_key)
    assert status == 200 and json.loads(raw)["count"] == counted.count, raw


# ---- refusals ----

def tool(name="get_weather", parameters=None, **kw) -> pb.Tool:
    function = pb.FunctionDefinition(name=name, **kw)
    if parameters is not None:
        function.parameters.update(parameters)
    return pb.Tool(type="function", function=function)


REFUSALS = [
    (dict(tool_choice=named("send_email")), "tool_choice names function \"send_email\", which is not among"),
    (dict(tools=[tool(), tool()]), "tools[1].function.name 'get_weather' is already the name of tools[0]"),
    (dict(tools=[tool(parameters={"type": "array"})]), "tools[0].function.parameters.type is \"array\""),
    (dict(tools=[tool(parameters={"type": "object", "required": "city"})]),
     "tools[0].function.parameters.required must be a list"),
    (dict(tools=[tool(parameters={"type": "object", "properties": {"a": {"type": "strin"}}})],
          tool_choice=pb.ToolChoice(mode="required")),
     "tools[0].function.parameters cannot constrain decoding (tool_choice required or named): Invalid type"),
    (dict(tools=[tool(parameters={"type": "object", "properties": {"a": {"minimum": float("nan")}}})]),
     "tools[0].function.parameters has a number that is not finite"),
    (dict(tools=[tool(name="x" * 65)]), "tools[0].function.name=\"xxx"),
    (dict(tools=[tool(name="has space")]), "use 1-64 characters of a-z, A-Z, 0-9, _ and -"),
    (dict(tools=[tool(name="")]), "tools[0].function.name is required"),
    (dict(tools=[pb.Tool(type="retrieval", function=pb.FunctionDefinition(name="a"))]),
     "tools[0].type=\"retrieval\" is not supported"),
    (dict(tools=[tool(name=f"f{i}") for i in range(129)]), "tools has 129 entries; at most 128"),
    (dict(tool_choice=pb.ToolChoice(mode="sometimes")), "tool_choice=\"sometimes\" is invalid"),
    (dict(tool_choice=pb.ToolChoice(function=pb.ToolChoiceFunction(name="get_weather"))),
     "tool_choice.function is set but tool_choice.type is not \"function\""),
    (dict(tools=[], tool_choice=pb.ToolChoice(mode="required")), "tool_choice required needs tools"),
    (dict(tools=[], parallel_tool_calls=w.BoolValue(value=False)), "parallel_tool_calls is only allowed with tools"),
    (dict(tool_choice=named("get_weather"), response_format=pb.ResponseFormat(type="json_object")),
     "both constrain the answer"),
    (dict(messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="tool", content="21")]),
     "messages[1] has role \"tool\" but no tool_call_id"),
    (dict(messages=[*round_trip_messages()[:2], pb.ChatMessage(role="tool", content="1", tool_call_id="call_zz")]),
     "messages[2].tool_call_id=\"call_zz\" answers no tool call"),
    (dict(messages=[pb.ChatMessage(role="user", content="a", tool_calls=round_trip_messages()[1].tool_calls)]),
     "messages[0].tool_calls is only allowed in assistant messages"),
    (dict(messages=[pb.ChatMessage(role="user", content="a", tool_call_id="call_abc")]),
     "messages[0].tool_call_id is only allowed in tool messages"),
    (dict(messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="assistant", tool_calls=[
        pb.ToolCall(function=pb.FunctionCall(name="get_weather"))])]), "messages[1].tool_calls[0].id is required"),
]


@pytest.mark.parametrize("fields, text", REFUSALS, ids=[r[1][:40] for r in REFUSALS])
async def test_tool_refusals_are_invalid_argument_naming_the_field(mesh, fields, text):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateChatCompletion(chat(**fields), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details(), err.value.details()


# ---- REST, with the openai SDK ----

async def test_openai_sdk_named_and_required_tool_calls(client):
    answer = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_JSON, temperature=0,
        max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    required = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_JSON, temperature=0,
        max_tokens=160, tool_choice="required", parallel_tool_calls=False)
    (call,) = required.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    plain = await client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                 tools=TOOLS_JSON, tool_choice="none", temperature=0, max_tokens=4)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


async def test_openai_sdk_streams_tool_call_deltas(client):
    stream = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_JSON, temperature=0,
        max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
        extra_body={"skip_cache": True})
    chunks = [c async for c in stream]
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert all(d.id is None and d.type is None and d.function.name is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), WEATHER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The SDK's own accumulating helper reads the same stream into a message with tool calls.
    async with client.chat.completions.stream(
            model="smol", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_JSON, temperature=0,
            max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}}) as helper:
        final = await helper.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


async def test_openai_sdk_round_trip_with_a_tool_message(client, tokenizer):
    first = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_JSON, temperature=0,
        max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    follow_up = [{"role": "user", "content": QUESTION}, message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = await client.chat.completions.create(model="smol", messages=follow_up, tools=TOOLS_JSON,
                                                  temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    expected = t.chat_ids(tokenizer, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [t.ToolCall(call.id, call.function.name,
                                                                        call.function.arguments)]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": call.id}],
        [t.spec_from_pb(x) for x in tools_pb()])
    assert answer.usage.prompt_tokens == len(expected)


async def test_rest_tool_refusals_are_400_naming_the_problem(mesh, rest):
    body = {"model": "smol", "messages": [{"role": "user", "content": "a"}], "tools": TOOLS_JSON,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    status, raw = await raw_http(rest, "POST", "/v1/chat/completions", body, mesh.api_key)
    error = json.loads(raw)["error"]
    assert status == 400 and "which is not among the tools" in error["message"] and error["param"] == "tool_choice"
    for bad, param in [({"tools": [*TOOLS_JSON, TOOLS_JSON[0]]}, f"tools[{len(TOOLS_JSON)}].function.name"),
                       ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {
                           "type": "object", "required": "city"}}}]}, "tools[0].function.parameters.required")]:
        status, raw = await raw_http(rest, "POST", "/v1/chat/completions", {**body, **bad}, mesh.api_key)
        assert status == 400 and json.loads(raw)["error"]["param"] == param, raw
    for bad, text in [({"tools": "get_weather"}, "Invalid type for 'tools'"),
                      ({"tool_choice": 3}, "Invalid type for 'tool_choice'"),
                      ({"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]},
                       "Invalid type for 'tools[0].function.parameters'"),
                      ({"parallel_tool_calls": "yes"}, "Invalid type for 'parallel_tool_calls'")]:
        status, raw = await raw_http(rest, "POST", "/v1/chat/completions", {**body, **bad}, mesh.api_key)
        assert status == 400 and text in json.loads(raw)["error"]["message"], raw


async def test_rest_raw_stream_of_tool_calls_has_openai_fields_only(mesh, rest):
    status, events = await sse(rest, mesh, "/v1/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS_JSON,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0,
        "max_tokens": 64, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [ch["delta"] for c in chunks for ch in c["choices"] if "tool_calls" in ch["delta"]]
    assert set(deltas[0]["tool_calls"][0]) == {"index", "id", "type", "function"}
    assert set(deltas[0]["tool_calls"][0]["function"]) == {"name", "arguments"}
    assert all(set(d["tool_calls"][0]) == {"index", "function"} and set(d["tool_calls"][0]["function"])
               == {"arguments"} for d in deltas[1:])
    others = [ch["delta"] for c in chunks for ch in c["choices"] if "tool_calls" not in ch["delta"]]
    assert others and all("tool_call_id" not in d for d in others)
