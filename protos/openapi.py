"""The OpenAPI 3.1 document of the REST sidecar (deploy/rest/openapi.json), generated from the protos.

grpc-gateway v1's protoc-gen-swagger (Debian ships it) writes Swagger 2.0 from the `google.api.http` rules, but it
describes the proto messages only, not what the sidecar's handlers serve on top of them: `prompt`, `input` and
`stop` as a string or a list, `"stream": true` answered with server-sent events, chat content parts, nulls for
"not given", `GET /v1/models/{model}`, `/health`, and OpenAI's error body for every 4xx. Swagger 2.0 has no
`oneOf` to say the first. So this script writes OpenAPI 3.1 itself: the routes from the http rules, the schemas
from the descriptors (field types, and each field's comment as its description), the bounds from GatewayConfig's
defaults, and the OpenAI shapes the handlers add (deploy/rest/handler.go, forward.go, errors.go).

Usage: python protos/openapi.py [--out FILE]   (`make protos` runs it; tests/test_protos.py checks the copy)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_OUT = REPO / "deploy" / "rest" / "openapi.json"
PROTO = "llmserve/inference/v1/inference.proto"
PACKAGE = ".llmserve.inference.v1."

F = descriptor_pb2.FieldDescriptorProto
INT32 = {"type": "integer", "format": "int32", "minimum": -(2 ** 31), "maximum": 2 ** 31 - 1}
UINT32 = {"type": "integer", "minimum": 0, "maximum": 2 ** 32 - 1}
INT64 = {"type": "integer", "format": "int64", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}
SCALARS = {
    F.TYPE_STRING: {"type": "string"}, F.TYPE_BOOL: {"type": "boolean"}, F.TYPE_FLOAT: {"type": "number"},
    F.TYPE_DOUBLE: {"type": "number"}, F.TYPE_INT32: INT32, F.TYPE_SINT32: INT32, F.TYPE_SFIXED32: INT32,
    F.TYPE_UINT32: UINT32, F.TYPE_FIXED32: UINT32, F.TYPE_INT64: INT64, F.TYPE_SINT64: INT64,
    F.TYPE_SFIXED64: INT64, F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
# google.protobuf wrappers travel as their plain value (a request's null means "not given").
WRAPPERS = {".google.protobuf.Int32Value": INT32, ".google.protobuf.UInt32Value": UINT32,
            ".google.protobuf.Int64Value": INT64, ".google.protobuf.FloatValue": {"type": "number"},
            ".google.protobuf.DoubleValue": {"type": "number"}, ".google.protobuf.BoolValue": {"type": "boolean"},
            ".google.protobuf.StringValue": {"type": "string"}}
# google.protobuf.Struct travels as any JSON object (a tool's parameters: a JSON Schema).
WRAPPERS[".google.protobuf.Struct"] = {"type": "object", "additionalProperties": True}

# The body of each POST route, and which messages are answered (a stream answers with events of its chunk type).
ROUTES = {
    "/v1/completions": ("CreateCompletion", "StreamCompletion"),
    "/v1/chat/completions": ("CreateChatCompletion", "StreamChatCompletion"),
    "/v1/chat": ("CreateChatCompletion", "StreamChatCompletion"),
    "/v1/embeddings": ("CreateEmbeddings", None),
    "/tokenize": ("Tokenize", None),
    "/v1/tokenize": ("Tokenize", None),
    "/detokenize": ("Detokenize", None),
    "/v1/detokenize": ("Detokenize", None),
}
# A route's operationId is its method's name; a second route of one method gets a suffix.
OPERATION_SUFFIX = {"/v1/chat": "Alias", "/v1/tokenize": "V1", "/v1/detokenize": "V1"}
ERROR_STATUSES = {
    "400": "The request is invalid: a field's type or value (the message names it and what to change).",
    "401": "No `Authorization: Bearer <key>` header, or the key is unknown, revoked or expired.",
    "403": "The key's tenant may not use this model or priority.",
    "404": "The model (or route) does not exist.",
    "405": "The route does not take this method.",
    "408": "The request did not arrive within the sidecar's read timeout.",
    "413": "The body is larger than the sidecar's --max-body-bytes.",
    "429": "A rate limit, concurrency cap or budget is exhausted (`Retry-After` says when to retry).",
    "431": "The headers are larger than the sidecar's --max-header-bytes.",
    "503": "The sidecar is at its concurrency limit, or no worker serves the model right now.",
    "504": "The request's deadline passed.",
}


def load(proto: str = PROTO) -> descriptor_pb2.FileDescriptorProto:
    """The file's descriptor with its comments (source info), compiled by grpc_tools' protoc."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        args = ["protoc", f"-I{ROOT}", f"-I{ROOT / 'third_party'}",
                f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}", f"--descriptor_set_out={out}",
                "--include_source_info", proto]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return next(f for f in files if f.name == proto)


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Leading comment per source path (4 = message_type, 2 = field; 6 = service, 2 = method), one line."""
    return {tuple(loc.path): " ".join(loc.leading_comments.split()) for loc in file.source_code_info.location
            if loc.leading_comments.strip()}


class Schemas:
    """JSON schemas of the file's messages, as the sidecar's JSON marshaler writes them (snake_case names,
    zero values present, enums by name)."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto):
        self.file = file
        self.docs = comments(file)
        self.messages = {m.name: (i, m) for i, m in enumerate(file.message_type)}
        self.enums = {e.name: e for e in file.enum_type}

    def message(self, name: str, *, request: bool) -> dict:
        index, msg = self.messages[name]
        properties = {}
        for j, field in enumerate(msg.field):
            schema = self.field(field, request=request)
            doc = self.docs.get((4, index, 2, j))
            if doc:
                schema = {**schema, "description": doc}
            properties[field.name] = schema
        schema = {"type": "object", "properties": properties}
        if doc := self.docs.get((4, index)):
            schema["description"] = doc
        if not request:
            schema["required"] = list(properties)  # EmitDefaults: every field is written
        return schema

    def field(self, field: F, *, request: bool) -> dict:
        if field.type == F.TYPE_MESSAGE and field.type_name in WRAPPERS:
            item = dict(WRAPPERS[field.type_name])
        elif field.type == F.TYPE_MESSAGE:
            item = {"$ref": f"#/components/schemas/{self.ref(field.type_name, request)}"}
        elif field.type == F.TYPE_ENUM:
            enum = self.enums[field.type_name.removeprefix(PACKAGE)]
            names = {"type": "string", "enum": [v.name for v in enum.value]}
            # Requests may name the value or give its number.
            item = {"anyOf": [names, {"type": "integer", "enum": [v.number for v in enum.value]}]} if request \
                else names
        elif field.type in (F.TYPE_INT64, F.TYPE_UINT64) and not request:
            item = {"type": "string", "pattern": "^-?[0-9]+$"}  # grpc-gateway writes 64-bit integers as strings
        else:
            item = dict(SCALARS[field.type])
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": item}
        return item

    def ref(self, type_name: str, request: bool) -> str:
        name = type_name.removeprefix(PACKAGE)
        return f"{name}Input" if request and name == "ChatMessage" else name


def nullable(schema: dict) -> dict:
    """The schema or JSON null (OpenAI clients send null for "not given"; the sidecar drops it)."""
    if "$ref" in schema or "anyOf" in schema or "oneOf" in schema:
        return {"anyOf": [schema, {"type": "null"}], **({"description": schema["description"]}
                                                        if "description" in schema else {})}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*types, "null"]}


def bounded(schema: dict, **bounds) -> dict:
    return {**schema, **bounds}


def request_schema(schemas: Schemas, name: str, cfg) -> dict:
    """The OpenAI-shaped body of a request message: the proto fields with the gateway's bounds, plus the shapes
    the sidecar's handler accepts and rewrites (handler.go normalize)."""
    schema = schemas.message(name, request=True)
    p = schema["properties"]
    text = {"type": "string", "minLength": 1}
    strings_or_one = lambda many, doc: {  # noqa: E731
        "description": doc, "oneOf": [text, {"type": "array", "minItems": 1, "maxItems": many, "items": text}]}
    p["model"] = bounded(p["model"], minLength=1, maxLength=cfg.max_model_length, examples=["smollm2"])
    if "user" in p:
        p["user"] = bounded(p["user"], maxLength=cfg.max_user_length)
    if "max_tokens" in p:
        for f in ("max_tokens", "max_completion_tokens"):
            p[f] = bounded(p[f], minimum=1)
        p["temperature"] = bounded(p["temperature"], minimum=0, maximum=2)
        p["top_p"] = bounded(p["top_p"], exclusiveMinimum=0, maximum=1)
        p["top_k"] = bounded(p["top_k"], minimum=0)
        p["n"] = bounded(p["n"], minimum=1, maximum=cfg.max_n)
        stop = {"type": "string", "minLength": 1, "maxLength": cfg.max_stop_length}
        p["stop"] = {"description": p["stop"]["description"],
                     "oneOf": [stop, {"type": "array", "maxItems": cfg.max_stop, "items": stop}]}
        p["stream"] = {"type": "boolean", "description": "Optional. Answer with server-sent events (`data: {chunk}`, "
                                                         "ending with `data: [DONE]`)."}
        p["stream_options"] = {"$ref": "#/components/schemas/StreamOptions",
                               "description": "Optional, streams only. include_usage: a last chunk with the usage."}
    if name == "CreateCompletionRequest":
        p["prompt"] = strings_or_one(cfg.max_prompts, "One prompt, or a list of prompts (choice i*n+j answers prompt "
                                                      "i), as text or token ids. Exactly one of prompt and prompts is "
                                                      "required.")
        ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
        p["prompt"]["oneOf"] += [ids, {"type": "array", "minItems": 1, "maxItems": cfg.max_prompts, "items": ids}]
        p["prompts"] = bounded(p["prompts"], minItems=1, maxItems=cfg.max_prompts, items=text)
        p["prompt_token_ids"] = bounded(p["prompt_token_ids"], minItems=1, maxItems=cfg.max_prompts)
        for f in ("max_tokens", "max_completion_tokens"):
            p[f] = bounded(p[f], minimum=0)  # 0 with echo: score the prompt
        p["logprobs"] = bounded(p["logprobs"], minimum=0, maximum=20)
        schema["oneOf"] = [{"required": ["model", "prompt"]}, {"required": ["model", "prompts"]},  # only one
                           {"required": ["model", "prompt_token_ids"]}]
    elif name == "CreateChatCompletionRequest":
        p["messages"] = bounded(p["messages"], minItems=1, maxItems=cfg.max_messages)
        p["top_logprobs"] = bounded(p["top_logprobs"], minimum=0, maximum=20)
        p["tools"] = bounded(p["tools"], maxItems=128)
        p["tool_choice"] = {"description": p["tool_choice"].get("description", ""), "oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]}, p["tool_choice"]]}
        schema["required"] = ["model", "messages"]
    elif name == "CreateEmbeddingsRequest":
        p["input"] = strings_or_one(cfg.max_embedding_inputs, "One text, or a list of texts, as text or token ids. "
                                                              "Exactly one of input and inputs is required.")
        ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
        p["input"]["oneOf"] += [ids, {"type": "array", "minItems": 1, "maxItems": cfg.max_embedding_inputs,
                                      "items": ids}]
        p["inputs"] = bounded(p["inputs"], minItems=1, maxItems=cfg.max_embedding_inputs, items=text)
        p["input_token_ids"] = bounded(p["input_token_ids"], minItems=1, maxItems=cfg.max_embedding_inputs)
        p["dimensions"] = bounded(p["dimensions"], minimum=1)
        p["encoding_format"] = {"type": "string", "enum": ["float", "base64"],
                                "description": "Optional. \"float\" (default) or \"base64\" (little-endian float32s)."}
        schema["oneOf"] = [{"required": ["model", "input"]}, {"required": ["model", "inputs"]},  # only one
                           {"required": ["model", "input_token_ids"]}]
    elif name == "TokenizeRequest":
        p["messages"] = bounded(p["messages"], minItems=1, maxItems=cfg.max_messages)
        schema["oneOf"] = [{"required": ["model", "prompt"]}, {"required": ["model", "messages"]}]
    elif name == "DetokenizeRequest":
        p["tokens"] = bounded(p["tokens"], items={"type": "integer", "minimum": 0, "maximum": 2**31 - 1})
        schema["required"] = ["model", "tokens"]
    # Null means "not given" (the sidecar drops it), so the fields a request needs are never null.
    needed = {"model", "messages", "prompt", "prompts", "prompt_token_ids", "input", "inputs", "input_token_ids",
              "tokens"}
    schema["properties"] = {k: (v if k in needed else nullable(v)) for k, v in p.items()}
    schema["additionalProperties"] = True  # unknown fields are ignored, as OpenAI's SDKs expect
    return schema


def response_fixups(schemas: dict) -> None:
    """What forward.go changes in responses: finish_reason null until a choice ends, a chunk's role only in its
    choice's first chunk, usage only in the last chunk, base64 embeddings as one string."""
    for name in ("CompletionChoice", "ChatChoice", "ChatChunkChoice"):
        schemas[name]["properties"]["finish_reason"] = nullable(schemas[name]["properties"]["finish_reason"])
    schemas["ChatDelta"]["required"] = ["content"]
    for name in ("ChatChoice", "ChatChunkChoice"):  # null without logprobs
        schemas[name]["properties"]["logprobs"] = nullable(schemas[name]["properties"]["logprobs"])
    nullable_number = {"type": ["number", "null"]}
    schemas["CompletionChoice"]["properties"]["logprobs"] = nullable({  # OpenAI's legacy shape (forward.go)
        "type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        "description": "With logprobs: per token its text, logprob (null for the first prompt token of an echo), "
                       "{token: logprob} of the top alternatives and the sampled token, and character offset.",
        "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                       "token_logprobs": {"type": "array", "items": nullable_number},
                       "top_logprobs": {"type": "array", "items": {"type": ["object", "null"],
                                                                   "additionalProperties": {"type": "number"}}},
                       "text_offset": {"type": "array", "items": {"type": "integer"}}}})
    for name in ("StreamCompletionResponse", "StreamChatCompletionResponse"):
        schemas[name]["required"] = [r for r in schemas[name]["required"] if r != "usage"]
        # With include_usage, the chunks before the last carry "usage": null, as OpenAI's do.
        schemas[name]["properties"]["usage"] = nullable(schemas[name]["properties"]["usage"])
    del schemas["Embedding"]["properties"]["embedding_bytes"]  # REST: base64 goes in `embedding` (forward.go)
    schemas["Embedding"]["required"].remove("embedding_bytes")
    vector = schemas["Embedding"]["properties"]["embedding"]
    schemas["Embedding"]["properties"]["embedding"] = {
        "description": vector.get("description", ""),
        "oneOf": [{"type": "array", "items": {"type": ["number", "string"]}},  # jsonpb writes NaN as "NaN"
                  {"type": "string", "contentEncoding": "base64"}]}


def tool_fixups(schemas: dict) -> None:
    """Tool calling (deploy/rest/tools.go): in requests only a function's name is required; in responses a message
    without calls has no tool_calls, "content" is null beside calls, and a call's later stream deltas carry only
    index and function.arguments."""
    schemas["Tool"]["required"] = ["function"]
    schemas["FunctionDefinition"]["required"] = ["name"]
    schemas["ToolChoice"]["required"] = []
    schemas["ToolCall"]["required"] = ["id", "function"]
    schemas["FunctionCall"]["required"] = []  # a request's call may omit its arguments (none)
    schemas["ToolCallDelta"]["required"] = ["index", "function"]
    message = schemas["ChatMessage"]
    message["required"] = ["role", "content"]
    message["properties"]["content"] = nullable(message["properties"]["content"])
    for gone in ("tool_call_id", "name"):
        message["properties"].pop(gone, None)
    schemas["ChatDelta"]["required"] = []


def error_schema() -> dict:
    nullable_string = {"type": ["string", "null"]}
    return {"type": "object", "required": ["error"], "description": "OpenAI's error body.", "properties": {
        "error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string", "minLength": 1, "description": "What went wrong and what to change."},
            "type": {"type": "string", "enum": ["invalid_request_error", "authentication_error", "permission_error",
                                                "not_found_error", "rate_limit_error", "service_unavailable_error",
                                                "timeout_error", "server_error"]},
            "param": {**nullable_string, "description": "The request field at fault, when one is."},
            "code": {**nullable_string, "description": "A machine-readable reason (invalid_api_key, ...)."}}}}}


def sse_event(chunk: str) -> dict:
    """One server-sent event of a stream: a chunk, the final `[DONE]`, or an error that ended the stream after
    its 200 (forward.go)."""
    def json_of(name: str) -> dict:
        return {"type": "string", "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{name}"}}
    return {"type": "object", "required": ["data"], "description": (
        f"With \"stream\": true: `data: <{chunk}>` events, then `data: [DONE]`; an error after the first event "
        "comes as `data: <Error>`."), "properties": {
            "data": {"anyOf": [{"const": "[DONE]"}, json_of(chunk), json_of("Error")]},
            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def errors(*codes: str) -> dict:
    return {code: {"description": ERROR_STATUSES[code], "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}}}, **({"headers": {"Retry-After": {
            "description": "Seconds to wait before retrying.", "schema": {"type": "string", "pattern": "^[0-9]+$"}}}}
        if code in ("429", "503") else {})} for code in codes}


def build() -> dict:
    sys.path.insert(0, str(REPO))
    from llmserve.common.config import GatewayConfig  # the bounds a default gateway enforces

    cfg = GatewayConfig()
    file = load()
    schemas = Schemas(file)
    docs = schemas.docs
    service_index = next(i for i, s in enumerate(file.service) if s.name == "InferenceService")
    method_docs = {m.name: docs.get((6, service_index, 2, j), "") for j, m in
                   enumerate(file.service[service_index].method)}
    methods = {m.name: m for m in file.service[service_index].method}

    components = {}
    for name in schemas.messages:
        if name.endswith("Request"):
            continue
        components[name] = schemas.message(name, request=False)
    response_fixups(components)
    components["StreamOptions"] = {"type": "object", "additionalProperties": True, "properties": {
        "include_usage": {"type": ["boolean", "null"],
                          "description": "Optional. A last chunk, with no choices, carries the usage."}}}
    message_input = schemas.message("ChatMessage", request=True)
    message_input["properties"]["role"] = {"type": "string", "enum": ["system", "user", "assistant", "tool",
                                                                     "developer"],
                                           "description": "Required. \"developer\" is OpenAI's newer name for "
                                                          "\"system\"."}
    content_part = {"type": "object", "required": ["type", "text"], "additionalProperties": True,
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message_input["properties"]["content"] = {
        "description": message_input["properties"]["content"].get("description", ""),
        "oneOf": [{"type": "string"}, {"type": "array", "items": content_part}, {"type": "null"}]}
    message_input.update(required=["role", "content"], additionalProperties=True)
    components["ChatMessageInput"] = message_input
    tool_fixups(components)
    components["Error"] = error_schema()
    for name in ("CreateCompletionRequest", "CreateChatCompletionRequest", "CreateEmbeddingsRequest",
                 "TokenizeRequest", "DetokenizeRequest"):
        components[name] = request_schema(schemas, name, cfg)
    components["Health"] = {"type": "object", "required": ["status", "gateway"], "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]}, "gateway": {"type": "string"},
        "message": {"type": "string"}}}

    paths: dict[str, dict] = {}
    for path, (unary, stream) in ROUTES.items():
        method = methods[unary]
        ok = {"application/json": {"schema": {"$ref": f"#/components/schemas/{method.output_type.split('.')[-1]}"}}}
        if stream:  # OpenAPI 3.1: the schema of one event
            chunk = methods[stream].output_type.split(".")[-1]
            ok["text/event-stream"] = {"schema": sse_event(chunk)}
        paths[path] = {"post": {
            "operationId": unary + OPERATION_SUFFIX.get(path, ""), "summary": method_docs[unary],
            "tags": ["inference"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{method.input_type.split('.')[-1]}"}}}},
            "responses": {"200": {"description": "The answer.", "content": ok},
                          **errors("400", "401", "403", "404", "408", "413", "429", "431", "503", "504")}}}
    paths["/v1/models"] = {"get": {
        "operationId": "ListModels", "summary": method_docs["ListModels"], "tags": ["inference"],
        "responses": {"200": {"description": "Aliases first, then versions.", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ListModelsResponse"}}}}, **errors("401", "429", "503")}}}
    paths["/v1/models/{model}"] = {"get": {
        "operationId": "RetrieveModel", "summary": "Returns one model the caller may use (ListModels, filtered).",
        "tags": ["inference"], "parameters": [{"name": "model", "in": "path", "required": True,
                                               "schema": {"type": "string", "minLength": 1}}],
        "responses": {"200": {"description": "The model.", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Model"}}}}, **errors("401", "404", "429", "503")}}}
    paths["/health"] = {"get": {
        "operationId": "Health", "summary": "200 when the gateway reports the InferenceService serving, else 503.",
        "tags": ["operations"], "security": [],
        "responses": {code: {"description": text, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Health"}}}} for code, text in (
                ("200", "The mesh can serve."), ("503", "The gateway is unreachable or not serving."))}}}
    paths["/openapi.json"] = {"get": {
        "operationId": "OpenAPI", "summary": "This document.", "tags": ["operations"], "security": [],
        "responses": {"200": {"description": "The OpenAPI document of this API.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "llmserve REST API (OpenAI-compatible)", "version": "v1", "description": (
            "The REST sidecar (deploy/rest) in front of the llmserve gateway. Generated by protos/openapi.py from "
            f"{PROTO} and the sidecar's handlers; the bounds are a default gateway's (GatewayConfig).")},
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "An llmserve API key."}},
                       "schemas": dict(sorted(components.items()))},
    }


def write(out: pathlib.Path = DEFAULT_OUT) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    write(parser.parse_args().out)


if __name__ == "__main__":
    main()
