"""Structured outputs and penalties over gRPC through the whole mesh (tiny random Llama with SmolLM2's tokenizer):
response_format json_object / json_schema and structured_outputs regex / choice / grammar hold whatever the random
model would say, uncompilable constraints and out-of-range penalties are INVALID_ARGUMENT at the gateway naming the
field, and logit_bias, min_tokens and stop_token_ids do what they say."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2
from google.protobuf import wrappers_pb2 as w

from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh
from tests.test_openai_surface import raw_http, rest, sidecar_binary  # noqa: F401  (the sidecar's fixtures)

TINY = "tiny-llama-v1"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 10000},
        "tags": {"type": "array", "items": {"enum": ["old", "new"]}, "maxItems": 3},
    },
    "required": ["city", "population", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    mesh = await start_mesh(make_config(), versions=[generate_version(TINY, f"file:{tiny_llama_dir}",
                                                                      context_length=512)],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    yield mesh
    await mesh.stop()


def struct(value: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def chat(**kw) -> pb.CreateChatCompletionRequest:
    fields = dict(model="tiny", messages=[pb.ChatMessage(role="user", content="Describe a city as JSON.")],
                  max_tokens=w.Int32Value(value=120), temperature=w.FloatValue(value=1.0), seed=w.Int64Value(value=3))
    fields.update(kw)
    return pb.CreateChatCompletionRequest(**fields)


def completion(**kw) -> pb.CreateCompletionRequest:
    fields = dict(model="tiny", prompt="Answer:", max_tokens=w.Int32Value(value=60),
                  temperature=w.FloatValue(value=1.0), seed=w.Int64Value(value=5))
    fields.update(kw)
    return pb.CreateCompletionRequest(**fields)


async def test_the_gateway_builds_the_grammar_tokenizer_at_start_not_at_the_first_constraint(mesh):
    # (first in this module: no constrained request has run yet) Building it holds the GIL for up to a second, so
    # every request on the gateway would stall at the first constrained one.
    compiler = mesh.gateway.pipeline._grammars[TINY]
    assert compiler._tokenizer is not None and compiler.num_compiled == 0


async def test_json_schema_output_validates_for_each_choice_unary_and_streamed(mesh):
    rf = pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchemaFormat(name="city", schema=struct(SCHEMA),
                                                                               strict=True))
    response = await mesh.stub.CreateChatCompletion(chat(response_format=rf, n=w.Int32Value(value=3)),
                                                    metadata=mesh.auth)
    assert len(response.choices) == 3
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    request = pb.StreamChatCompletionRequest(**{f.name: v for f, v in chat(response_format=rf).ListFields()})
    pieces = [c.delta.content async for chunk in mesh.stub.StreamChatCompletion(request, metadata=mesh.auth)
              for c in chunk.choices]
    text = "".join(pieces)
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_json_object_and_structured_outputs_json_on_completions(mesh):
    # A random model writes strings until it happens to close them: a generous budget, and seeds that finish.
    response = await mesh.stub.CreateCompletion(completion(
        response_format=pb.ResponseFormat(type="json_object"), max_tokens=w.Int32Value(value=300),
        temperature=w.FloatValue(value=0.0)), metadata=mesh.auth)
    (choice,) = response.choices
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert choice.text.startswith("{")
    response = await mesh.stub.CreateCompletion(completion(
        structured_outputs=pb.StructuredOutputs(json=struct({"enum": [1, 2.5, "x"]}))), metadata=mesh.auth)
    assert json.loads(response.choices[0].text) in (1, 2.5, "x")


async def test_regex_choice_and_grammar_are_honoured(mesh):
    for seed in range(3):
        response = await mesh.stub.CreateCompletion(completion(
            seed=w.Int64Value(value=seed), structured_outputs=pb.StructuredOutputs(regex=r"\d{3}-[a-z]{2,5}")),
            metadata=mesh.auth)
        assert re.fullmatch(r"\d{3}-[a-z]{2,5}", response.choices[0].text)
        response = await mesh.stub.CreateChatCompletion(chat(
            seed=w.Int64Value(value=seed), structured_outputs=pb.StructuredOutputs(choice=["yes", "no", "maybe"])),
            metadata=mesh.auth)
        assert response.choices[0].message.content in ("yes", "no", "maybe")
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    response = await mesh.stub.CreateCompletion(completion(structured_outputs=pb.StructuredOutputs(grammar=gbnf)),
                                                metadata=mesh.auth)
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", response.choices[0].text), response.choices[0].text


@pytest.mark.parametrize("kw, field, reason", [
    ({"response_format": pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchemaFormat(
        name="x", schema=struct({"type": "object", "properties": {"a": {"type": "strin"}}})))},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchemaFormat(
        name="x", schema=struct({"type": "integer", "minimum": 5, "maximum": 1})))},
     "response_format.json_schema.schema", "minimum"),
    ({"response_format": pb.ResponseFormat(type="json_schema")}, "response_format.json_schema.schema", "required"),
    ({"response_format": pb.ResponseFormat(type="yaml")}, "response_format.type", "json_schema"),
    ({"structured_outputs": pb.StructuredOutputs(regex="(ab")}, "structured_outputs.regex", "unclosed"),
    ({"structured_outputs": pb.StructuredOutputs(grammar="start: foo")}, "structured_outputs.grammar", "foo"),
    ({"structured_outputs": pb.StructuredOutputs(regex="a", choice=["b"])}, "structured_outputs", "exactly one"),
    ({"structured_outputs": pb.StructuredOutputs(regex="a"), "response_format": pb.ResponseFormat(
        type="json_object")}, "structured_outputs", "not both"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -3.0}, "frequency_penalty", "[-2, 2]"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "(0, 2]"),
    ({"logit_bias": {5: 101.0}}, "logit_bias[5]", "[-100, 100]"),
    ({"logit_bias": {10**8: 1.0}}, "logit_bias", "outside the vocabulary"),
    ({"stop_token_ids": [49152]}, "stop_token_ids", "outside the vocabulary"),
    ({"min_tokens": 100}, "min_tokens", "max_tokens"),
])
async def test_bad_constraints_and_penalties_are_invalid_argument_naming_the_field(mesh, kw, field, reason):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.CreateCompletion(completion(**kw), metadata=mesh.auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details() and reason in info.value.details(), info.value.details()


async def test_logit_bias_min_tokens_and_stop_token_ids(mesh, tiny_llama):
    tokenizer = tiny_llama[1]
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    response = await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=5), ignore_eos=True,
                                                           logit_bias={token: 100.0}), metadata=mesh.auth)
    assert response.choices[0].text == " banana" * 5
    eos = tokenizer.eos_token_id
    response = await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=30),
                                                           logit_bias={eos: 100.0}), metadata=mesh.auth)
    assert (response.choices[0].finish_reason, response.usage.completion_tokens) == ("stop", 1)
    response = await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=30), min_tokens=4,
                                                           logit_bias={eos: 100.0}), metadata=mesh.auth)
    assert (response.choices[0].finish_reason, response.usage.completion_tokens) == ("stop", 5)
    # stop_token_ids: the forced token ends the output at once, and is not in the text
    response = await mesh.stub.CreateCompletion(completion(max_tokens=w.Int32Value(value=10), ignore_eos=True,
                                                           logit_bias={token: 100.0}, stop_token_ids=[token],
                                                           min_tokens=0), metadata=mesh.auth)
    assert (response.choices[0].finish_reason, response.choices[0].text) == ("stop", "")


async def test_penalties_change_sampled_output(mesh):
    base = completion(prompt="la la la la la la la la", max_tokens=w.Int32Value(value=16), ignore_eos=True,
                      temperature=w.FloatValue(value=0.0))
    plain = (await mesh.stub.CreateCompletion(base, metadata=mesh.auth)).choices[0].text
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        request = pb.CreateCompletionRequest()
        request.CopyFrom(base)
        for k, v in kw.items():
            setattr(request, k, v)
        text = (await mesh.stub.CreateCompletion(request, metadata=mesh.auth)).choices[0].text
        assert text != plain, kw


# ---- over REST, with the official openai SDK (the sidecar in front of this module's gateway) ----

openai = pytest.importorskip("openai", reason="the openai SDK is part of the dev extra (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
async def client(rest, mesh):  # noqa: F811
    async with openai.AsyncOpenAI(base_url=rest + "/v1", api_key=mesh.api_key, max_retries=0, timeout=60) as c:
        yield c


async def test_rest_response_format_json_schema_and_json_object(client):
    response = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A city?"}], max_tokens=120, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A city?"}], max_tokens=120, temperature=1.0, seed=4,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), SCHEMA)
    response = await client.completions.create(model="tiny", prompt="{", max_tokens=300, temperature=0.0,
                                               extra_body={"response_format": {"type": "json_object"}})
    choice = response.choices[0]
    assert choice.text.startswith("{") and (choice.finish_reason == "length" or isinstance(json.loads(choice.text),
                                                                                          dict))


async def test_rest_structured_outputs_regex_choice_and_vllm_guided_names(client, rest, mesh):  # noqa: F811
    response = await client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, seed=1,
                                               extra_body={"structured_outputs": {"regex": r"[A-Z]{2}\d{3}"}})
    assert re.fullmatch(r"[A-Z]{2}\d{3}", response.choices[0].text)
    response = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Pick"}], max_tokens=10, temperature=1.0, seed=2,
        extra_body={"structured_outputs": {"choice": ["left", "right"], "regex": None}})
    assert response.choices[0].message.content in ("left", "right")
    response = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Pick"}], max_tokens=10, temperature=1.0, seed=2,
        extra_body={"guided_choice": ["up", "down"]})
    assert response.choices[0].message.content in ("up", "down")
    # the schema as JSON text (vLLM accepts both) is taken as the object
    status, body = await raw_http(rest, "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 120, "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": json.dumps(SCHEMA)}}},
        mesh.api_key)
    assert status == 200, body
    jsonschema.validate(json.loads(json.loads(body)["choices"][0]["message"]["content"]), SCHEMA)


async def test_rest_logit_bias_min_tokens_and_stop_token_ids(client, tiny_llama):
    tokenizer = tiny_llama[1]
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    response = await client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0.0,
                                               logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert response.choices[0].text == " banana" * 3
    response = await client.completions.create(
        model="tiny", prompt="x", max_tokens=20, temperature=0.0, logit_bias={str(tokenizer.eos_token_id): 100},
        extra_body={"min_tokens": 3})
    assert (response.choices[0].finish_reason, response.usage.completion_tokens) == ("stop", 4)
    response = await client.completions.create(
        model="tiny", prompt="x", max_tokens=20, temperature=0.0, logit_bias={str(token): 100},
        frequency_penalty=0.5, presence_penalty=0.5, extra_body={"stop_token_ids": [token], "ignore_eos": True,
                                                                 "repetition_penalty": 1.1})
    assert (response.choices[0].finish_reason, response.choices[0].text) == ("stop", "")


@pytest.mark.parametrize("kw, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "structured_outputs.regex", "unclosed"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"5": 200}}, "logit_bias[5]", "[-100, 100]"),
])
async def test_rest_bad_constraints_and_penalties_are_400_naming_the_part(client, kw, param, reason):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=5, **kw)
    assert info.value.status_code == 400
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
    assert param in message and reason in message, message
