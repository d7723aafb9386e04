"""The OpenAI request/response surface that SDKs and harnesses rely on, over gRPC and over REST (the sidecar built
from the protos, driven by the official `openai` SDK and by raw SSE parsing), against one in-process mesh: the tiny
Llama with SmolLM2's tokenizer and chat template, and MiniLM for embeddings.

Covered: stream shapes (role chunk first, content deltas, a finish_reason chunk, the usage chunk, [DONE]; one id,
one created, a system_fingerprint), also for answers from the response cache and for completions; errors in the
middle of a stream; Tokenize/Detokenize; chat prefill (continue_final_message), names, several system messages,
max_completion_tokens; embeddings as base64, from token ids, and dimensions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import socket
import struct
import subprocess

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.inference.v1 import inference_pb2 as pb
from tests.conftest import REPO
from tests.helpers.mesh import embed_version, generate_version, start_mesh
from tests.helpers.tiny_models import MINILM_SOURCE

openai = pytest.importorskip("openai", reason="the openai SDK is part of the dev extra (pip install -e '.[dev]')")

TINY = "tiny-llama-v1"
EMBED = "minilm-v1"
WORKER_TEMPLATED = "tiny-worker-templated-v1"
MATRYOSHKA = "minilm-matryoshka-v1"
SIDECAR = REPO / "deploy" / "rest" / "bin" / "llmserve-rest"


@pytest.fixture(scope="module")
def sidecar_binary():
    built = subprocess.run(["bash", str(REPO / "deploy" / "rest" / "build.sh")], cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    if built.returncode == 2:  # no Go toolchain here (deploy/rest/install-deps.sh installs it with apt)
        pytest.skip("the REST sidecar cannot be built on this machine: " + built.stderr.strip().replace("\n", " "))
    assert built.returncode == 0, f"deploy/rest/build.sh failed:\n{built.stdout}\n{built.stderr}"
    return SIDECAR


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    # The same weights, but the gateway cannot load this version's tokenizer: it sends the messages and the worker
    # applies the chat template itself (the path whose count must agree with the gateway's).
    worker_templated = generate_version(WORKER_TEMPLATED, f"file:{tiny_llama_dir}", context_length=512)
    worker_templated.labels["tokenizer_source"] = "file:/nonexistent/tokenizer"
    # MiniLM registered as if trained for truncated vectors: the path of `dimensions` (the real MiniLM refuses it).
    matryoshka = embed_version(MATRYOSHKA, MINILM_SOURCE)
    matryoshka.labels["matryoshka_dimensions"] = "128,384"
    mesh = await start_mesh(make_config(), versions=[
        generate_version(TINY, f"file:{tiny_llama_dir}", context_length=512), embed_version(EMBED, MINILM_SOURCE),
        worker_templated, matryoshka], aliases={"tiny": [(TINY, 1)], "embed": [(EMBED, 1)]},
        worker_models=[[TINY, EMBED, WORKER_TEMPLATED, MATRYOSHKA]])
    yield mesh
    await mesh.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
async def rest(mesh, sidecar_binary):
    """Base URL of a sidecar in front of the in-process gateway (the test's event loop serves it: async clients)."""
    port = _free_port()
    child = subprocess.Popen([str(sidecar_binary), "--listen", f"127.0.0.1:{port}", "--gateway",
                              f"127.0.0.1:{mesh.gateway.service.port}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if (await raw_http(base, "GET", "/health"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the sidecar did not become healthy")
        yield base
    finally:
        child.terminate()
        _, err = child.communicate(timeout=10)
        assert b"sk-" not in err and b"Bearer" not in err, "the access log holds a key"


@pytest.fixture(scope="module")
async def client(rest, mesh):
    async with openai.AsyncOpenAI(base_url=rest + "/v1", api_key=mesh.api_key, max_retries=0, timeout=60) as c:
        yield c


async def raw_http(base: str, method: str, path: str, body: dict | None = None, key: str | None = None
                   ) -> tuple[int, str]:
    """(status, body) of one HTTP/1.0 request (the server then streams without chunking and closes)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n"
    writer.write(head.encode() + data)
    raw = (await asyncio.wait_for(reader.read(), 60)).decode()
    writer.close()
    status_line, _, rest = raw.partition("\r\n")
    return int(status_line.split()[1]), rest.partition("\r\n\r\n")[2]


async def sse(rest: str, mesh, path: str, body: dict) -> tuple[int, list[str]]:
    """(status, the data of each server-sent event) of one raw streaming request."""
    status, raw = await raw_http(rest, "POST", path, body, mesh.api_key)
    assert raw.endswith("\n\n"), raw[-200:]
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return status, [e.removeprefix("data: ") for e in events]


def chat(**kw) -> pb.StreamChatCompletionRequest:
    fields = dict(model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=w.Int32Value(value=6),
                  temperature=w.FloatValue(value=0.0), ignore_eos=True)
    fields.update(kw)
    return pb.StreamChatCompletionRequest(**fields)


def assert_chat_stream_shape(chunks: list[dict], *, n: int = 1, usage: bool) -> None:
    """OpenAI's chat stream: per choice a role-only chunk first, content deltas, the finish_reason on its last chunk;
    then the usage chunk (no choices) when asked; one id, created and system_fingerprint throughout."""
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["system_fingerprint"].startswith("fp_") for c in chunks)
    assert len({c["system_fingerprint"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    body = chunks[:-1] if usage else chunks
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        assert all(c["usage"] is None for c in body)  # OpenAI: "usage": null in every other chunk
    for index in range(n):
        mine = [ch for c in body for ch in c["choices"] if ch["index"] == index]
        assert (mine[0]["delta"]["role"], mine[0]["delta"]["content"]) == ("assistant", "")
        assert mine[0]["finish_reason"] is None
        assert all("role" not in ch["delta"] for ch in mine[1:])
        assert [ch["finish_reason"] for ch in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] in ("stop", "length")
        assert len(mine) >= 3, "content arrives in deltas"


# ---- streams ----

async def test_grpc_chat_stream_opens_with_the_role_and_shares_id_created_fingerprint(mesh):
    chunks = [c async for c in mesh.stub.StreamChatCompletion(chat(skip_cache=True), metadata=mesh.auth)]
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and not first.finish_reason
    assert all(ch.delta.role == "" for c in chunks[1:] for ch in c.choices)
    assert len({(c.id, c.created, c.system_fingerprint) for c in chunks}) == 1
    assert chunks[0].system_fingerprint.startswith("fp_")
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 6  # no stream_options: the last chunk carries usage
    unary = await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest.FromString(
        chat().SerializeToString()), metadata=mesh.auth)
    assert unary.system_fingerprint == chunks[0].system_fingerprint
    assert "".join(ch.delta.content for c in chunks for ch in c.choices) == unary.choices[0].message.content


@pytest.mark.parametrize("cached", [False, True])
async def test_rest_chat_stream_is_shaped_as_openai_live_and_from_the_cache(mesh, rest, cached):
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"Tell me {cached}"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    status, live = await sse(rest, mesh, "/v1/chat/completions", body)
    assert status == 200 and live[-1] == "[DONE]"
    if cached:  # the same request again: served from the response cache, replayed in the same pieces
        status, events = await sse(rest, mesh, "/v1/chat/completions", body)
    else:
        events = live
    chunks = [json.loads(e) for e in events[:-1]]
    assert_chat_stream_shape(chunks, n=2, usage=True)
    if cached:
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == chunks[-1]["usage"]["prompt_tokens"]
        live_chunks = [json.loads(e) for e in live[:-1]]
        pieces = lambda cs, i: [ch["delta"].get("content") for c in cs for ch in c["choices"]  # noqa: E731
                                if ch["index"] == i]
        assert pieces(chunks, 0) == pieces(live_chunks, 0) and pieces(chunks, 1) == pieces(live_chunks, 1)
        assert chunks[0]["id"] != live_chunks[0]["id"]


async def test_openai_sdk_reads_a_cached_chat_stream_as_a_live_one(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "cache this stream"}], max_tokens=5,
                  temperature=0, extra_body={"ignore_eos": True})
    live = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    cached = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    for chunks in (live, cached):
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) >= 3
        assert len({(c.id, c.created, c.system_fingerprint) for c in chunks}) == 1
    assert [c.choices[0].delta.content for c in cached] == [c.choices[0].delta.content for c in live]
    unary = await client.chat.completions.create(**kwargs)
    assert unary.system_fingerprint == live[0].system_fingerprint
    assert "".join(c.choices[0].delta.content for c in cached) == unary.choices[0].message.content


@pytest.mark.parametrize("cached", [False, True])
async def test_rest_completion_stream_shape(mesh, rest, cached):
    body = {"model": "tiny", "prompt": f"Once upon a {cached}", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    _, live = await sse(rest, mesh, "/v1/completions", body)
    events = (await sse(rest, mesh, "/v1/completions", body))[1] if cached else live
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"], c["system_fingerprint"]) for c in chunks}) == 1
    assert all(c["object"] == "text_completion" for c in chunks)
    text_chunks, usage = chunks[:-1], chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert len(text_chunks) >= 3, "text arrives in deltas, from the cache too"
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in text_chunks) == 5
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert [c["choices"][0]["text"] for c in text_chunks] == [json.loads(e)["choices"][0]["text"]
                                                               for e in live[:-2]]


async def test_rest_stream_without_include_usage_has_no_usage_field(mesh, rest):
    _, events = await sse(rest, mesh, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
        "temperature": 0, "skip_cache": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c for c in chunks)
    assert_chat_stream_shape(chunks, usage=False)


# ---- Tokenize / Detokenize ----

def tokenize(**kw) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(**{"model": "tiny", **kw})


def msgs(*pairs) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=r, content=c) for r, c in pairs]


async def test_tokenize_counts_what_a_request_is_charged(mesh, tiny_llama):
    prompt = "The quick brown fox"
    got = await mesh.stub.Tokenize(tokenize(prompt=prompt, return_token_strs=True), metadata=mesh.auth)
    assert list(got.tokens) == tiny_llama[1].encode(prompt, add_special_tokens=False)
    assert got.count == len(got.tokens) and got.max_model_len == 512 and len(got.token_strs) == got.count
    completion = await mesh.stub.CreateCompletion(pb.CreateCompletionRequest(
        model="tiny", prompt=prompt, max_tokens=w.Int32Value(value=1)), metadata=mesh.auth)
    assert completion.usage.prompt_tokens == got.count
    conversation = msgs(("system", "Be brief."), ("user", "Hi"))
    templated = await mesh.stub.Tokenize(tokenize(messages=conversation), metadata=mesh.auth)
    answer = await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
        model="tiny", messages=conversation, max_tokens=w.Int32Value(value=1)), metadata=mesh.auth)
    assert answer.usage.prompt_tokens == templated.count
    text = tiny_llama[1].decode(list(templated.tokens))
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    bare = await mesh.stub.Tokenize(tokenize(messages=conversation, add_generation_prompt=w.BoolValue(value=False)),
                                    metadata=mesh.auth)
    assert list(templated.tokens[:bare.count]) == list(bare.tokens) and bare.count < templated.count
    embed = await mesh.stub.Tokenize(tokenize(model="embed", prompt="a cat sat"), metadata=mesh.auth)
    vectors = await mesh.stub.CreateEmbeddings(pb.CreateEmbeddingsRequest(model="embed", input="a cat sat"),
                                               metadata=mesh.auth)
    assert embed.count == vectors.usage.prompt_tokens == 5  # [CLS] a cat sat [SEP]


async def test_detokenize_round_trips_and_names_a_bad_id(mesh):
    got = await mesh.stub.Tokenize(tokenize(messages=msgs(("user", "Hello there"))), metadata=mesh.auth)
    back = await mesh.stub.Detokenize(pb.DetokenizeRequest(model="tiny", tokens=got.tokens), metadata=mesh.auth)
    assert back.prompt.startswith("<|im_start|>") and "Hello there" in back.prompt
    for bad, shown in ((49152, "tokens[1]=49152"), (-3, "tokens[1]=-3")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.Detokenize(pb.DetokenizeRequest(model="tiny", tokens=[1, bad]), metadata=mesh.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(shown)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Detokenize(pb.DetokenizeRequest(model="tiny", tokens=[1] * 513), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 512" in err.value.details()


@pytest.mark.parametrize("request_, code, text", [
    (tokenize(), grpc.StatusCode.INVALID_ARGUMENT, "prompt or messages is required"),
    (tokenize(prompt="a", messages=msgs(("user", "b"))), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    (tokenize(model="nope", prompt="a"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
    (tokenize(model="embed", messages=msgs(("user", "b"))), grpc.StatusCode.INVALID_ARGUMENT, "no chat template"),
    (tokenize(prompt="x" * 70_000), grpc.StatusCode.INVALID_ARGUMENT, "prompt is 70000 bytes"),
    (tokenize(messages=msgs(("robot", "b"))), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role='robot'"),
    (tokenize(model=WORKER_TEMPLATED, prompt="a"), grpc.StatusCode.FAILED_PRECONDITION,
     f"{WORKER_TEMPLATED!r} has no tokenizer the gateway can load"),
], ids=["empty", "both", "unknown model", "embed chat", "too long", "bad role", "no tokenizer"])
async def test_tokenize_refusals(mesh, request_, code, text):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Tokenize(request_, metadata=mesh.auth)
    assert err.value.code() == code and text in err.value.details()


async def test_tokenize_checks_the_key_and_the_tenant(mesh):
    from llmserve.admin.v1 import tenants_pb2 as tpb

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Tokenize(tokenize(prompt="a"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name="embed-only",
                                                                              allowed_models=["embed"])))
    key = (await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="embed-only"))).key
    await mesh.gateway.view.tenants.wait_for(lambda t: "embed-only" in t, 5)
    await mesh.gateway.view.keys.wait_for(lambda k: len(k) >= 2, 5)
    auth = (("authorization", f"Bearer {key}"),)
    for call in (mesh.stub.Tokenize(tokenize(prompt="a"), metadata=auth),
                 mesh.stub.Detokenize(pb.DetokenizeRequest(model="tiny", tokens=[1]), metadata=auth)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await mesh.stub.Tokenize(tokenize(model="embed", prompt="a"), metadata=auth)).count == 3


async def test_rest_tokenize_and_detokenize_as_vllm(mesh, rest):
    status, raw = await raw_http(rest, "POST", "/tokenize", {"model": "tiny", "prompt": "Hello there"},
                                 mesh.api_key)
    assert status == 200, raw
    body = json.loads(raw)
    assert set(body) >= {"count", "max_model_len", "tokens"} and body["count"] == 2 == len(body["tokens"])
    status, raw = await raw_http(rest, "POST", "/tokenize", {
        "model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "add_generation_prompt": True}, mesh.api_key)
    chat_count = json.loads(raw)["count"]
    status, raw = await raw_http(rest, "POST", "/v1/tokenize", {
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}, mesh.api_key)
    assert status == 200 and json.loads(raw)["count"] == chat_count > 2
    status, raw = await raw_http(rest, "POST", "/detokenize", {"model": "tiny", "tokens": body["tokens"]},
                                 mesh.api_key)
    assert status == 200 and json.loads(raw) == {"prompt": "Hello there"}
    status, raw = await raw_http(rest, "POST", "/detokenize", {"model": "tiny", "tokens": [1, 10 ** 6]},
                                 mesh.api_key)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "tokens[1]" and "tokens[1]=1000000" in error["message"]
    status, raw = await raw_http(rest, "POST", "/detokenize", {"model": "tiny", "tokens": [1.5]}, mesh.api_key)
    assert status == 400 and json.loads(raw)["error"]["param"] == "tokens[0]"
    status, raw = await raw_http(rest, "POST", "/tokenize", {"model": "tiny", "prompt": "a"})
    assert status == 401, raw


# ---- chat details ----

PREFILL = msgs(("system", "Be brief."), ("system", "Answer in French."), ("user", "The capital of France?"),
               ("assistant", "The capital is"))


async def test_continue_final_message_prefills_the_assistant_turn(mesh):
    prefill = await mesh.stub.Tokenize(tokenize(messages=PREFILL, continue_final_message=True), metadata=mesh.auth)
    fresh = await mesh.stub.Tokenize(tokenize(messages=PREFILL), metadata=mesh.auth)
    back = await mesh.stub.Detokenize(pb.DetokenizeRequest(model="tiny", tokens=prefill.tokens), metadata=mesh.auth)
    assert back.prompt.endswith("<|im_start|>assistant\nThe capital is")  # no end of turn: the model continues
    assert back.prompt.count("<|im_start|>system") == 2 and prefill.count < fresh.count
    request = pb.CreateChatCompletionRequest(model="tiny", messages=PREFILL, continue_final_message=True,
                                             add_generation_prompt=w.BoolValue(value=False),
                                             max_tokens=w.Int32Value(value=6), temperature=w.FloatValue(value=0.0),
                                             ignore_eos=True, skip_cache=True)
    answer = await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)
    by_ids = await mesh.stub.CreateCompletion(pb.CreateCompletionRequest(
        model="tiny", prompt_token_ids=[pb.PromptTokenIds(token_ids=prefill.tokens)], max_tokens=w.Int32Value(value=6),
        temperature=w.FloatValue(value=0.0), ignore_eos=True), metadata=mesh.auth)
    assert answer.choices[0].message.content == by_ids.choices[0].text
    assert answer.usage.prompt_tokens == prefill.count
    # The worker templating itself (no gateway tokenizer for this version) counts and continues the same.
    request.model = WORKER_TEMPLATED
    templated_by_worker = await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)
    assert templated_by_worker.usage.prompt_tokens == prefill.count
    assert templated_by_worker.choices[0].message.content == answer.choices[0].message.content
    request.continue_final_message, request.model = False, "tiny"
    request.ClearField("add_generation_prompt")
    assert (await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)).usage.prompt_tokens == fresh.count


@pytest.mark.parametrize("fields, text", [
    (dict(messages=PREFILL, continue_final_message=True, add_generation_prompt=w.BoolValue(value=True)),
     "cannot both be true"),
    (dict(messages=PREFILL[:3], continue_final_message=True), "must be the assistant's"),
    (dict(messages=[pb.ChatMessage(role="user", content="a", name="n" * 65)], max_tokens=w.Int32Value(value=1)),
     "messages[0].name is 65 characters"),
    (dict(messages=msgs(("user", "a")), max_tokens=w.Int32Value(value=3), max_completion_tokens=w.Int32Value(value=4)),
     "max_tokens=3 and max_completion_tokens=4 differ"),
], ids=["both", "not assistant", "long name", "max tokens differ"])
async def test_chat_detail_refusals(mesh, fields, text):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(model="tiny", **fields),
                                             metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()


async def test_names_and_max_completion_tokens_reach_the_worker(mesh):
    named = [pb.ChatMessage(role="user", content="Hi", name="alice")]
    for model in ("tiny", WORKER_TEMPLATED):
        answer = await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            model=model, messages=named, max_completion_tokens=w.Int32Value(value=3), ignore_eos=True,
            temperature=w.FloatValue(value=0.0), skip_cache=True), metadata=mesh.auth)
        # SmolLM2's template does not render names: the count is the unnamed conversation's
        counted = await mesh.stub.Tokenize(tokenize(messages=named), metadata=mesh.auth)
        assert answer.usage.completion_tokens == 3 and answer.usage.prompt_tokens == counted.count


async def test_openai_sdk_chat_details_over_rest(client, capfd):
    kwargs = dict(model="tiny", temperature=0, max_completion_tokens=4, user="user-7f3a-secret",
                  messages=[{"role": "system", "content": "One."}, {"role": "system", "content": "Two."},
                            {"role": "user", "content": "Hi", "name": "bob"},
                            {"role": "assistant", "content": "Hello"}],
                  extra_body={"ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False,
                              "skip_cache": True})
    unary = await client.chat.completions.create(**kwargs)
    assert unary.usage.completion_tokens == 4 and unary.system_fingerprint.startswith("fp_")
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == unary.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(**{**kwargs, "max_tokens": 5})
    assert "max_completion_tokens" in err.value.message
    assert "user-7f3a-secret" not in "".join(capfd.readouterr()), "the user id was logged"


# ---- embeddings ----

def embeddings(**kw) -> pb.CreateEmbeddingsRequest:
    return pb.CreateEmbeddingsRequest(**{"model": "embed", **kw})


def floats(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data))


async def test_embeddings_base64_token_ids_and_dimensions_over_grpc(mesh):
    texts = ["a cat sat on the mat", "stock markets fell"]
    plain = await mesh.stub.CreateEmbeddings(embeddings(inputs=texts), metadata=mesh.auth)
    packed = await mesh.stub.CreateEmbeddings(embeddings(inputs=texts, encoding_format="base64"), metadata=mesh.auth)
    for p, b in zip(plain.data, packed.data):
        assert not b.embedding and len(b.embedding_bytes) == 4 * 384 and floats(b.embedding_bytes) == list(p.embedding)
    ids = [list((await mesh.stub.Tokenize(tokenize(model="embed", prompt=t), metadata=mesh.auth)).tokens)
           for t in texts]
    by_ids = await mesh.stub.CreateEmbeddings(embeddings(input_token_ids=[pb.PromptTokenIds(token_ids=i) for i in ids]),
                                              metadata=mesh.auth)
    assert by_ids.usage.prompt_tokens == plain.usage.prompt_tokens == sum(map(len, ids))
    for p, q in zip(plain.data, by_ids.data):
        assert max(abs(x - y) for x, y in zip(p.embedding, q.embedding)) < 1e-5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateEmbeddings(embeddings(input_token_ids=[pb.PromptTokenIds(token_ids=[101, 30522])]),
                                         metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input_token_ids[0][1]=30522 is outside the vocabulary")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateEmbeddings(embeddings(input="a", dimensions=w.Int32Value(value=128)), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot shorten its vectors" in err.value.details()
    cut = await mesh.stub.CreateEmbeddings(embeddings(model=MATRYOSHKA, input=texts[0],
                                                      dimensions=w.Int32Value(value=128)), metadata=mesh.auth)
    (vector,) = [list(d.embedding) for d in cut.data]
    prefix = list(plain.data[0].embedding)[:128]
    norm = math.sqrt(sum(x * x for x in prefix))
    assert len(vector) == 128 and max(abs(x - y / norm) for x, y in zip(vector, prefix)) < 1e-5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateEmbeddings(embeddings(model=MATRYOSHKA, input="a", dimensions=w.Int32Value(value=100)),
                                         metadata=mesh.auth)
    assert "use one of 128, 384" in err.value.details()


async def test_embeddings_over_rest_with_the_sdk(mesh, rest, client):
    texts = ["a cat sat on the mat", "stock markets fell"]
    as_text = await client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64 and decodes
    ids = [json.loads((await raw_http(rest, "POST", "/tokenize", {"model": "embed", "prompt": t}, mesh.api_key))[1]
                      )["tokens"] for t in texts]
    as_ids = await client.embeddings.create(model="embed", input=ids)
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens
    for a, b in zip(as_text.data, as_ids.data):
        assert len(a.embedding) == 384 and max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-5
    one = await client.embeddings.create(model="embed", input=ids[0], encoding_format="float")
    assert max(abs(x - y) for x, y in zip(one.data[0].embedding, as_text.data[0].embedding)) < 1e-5
    status, raw = await raw_http(rest, "POST", "/v1/embeddings", {"model": "embed", "input": texts[0],
                                                                  "encoding_format": "base64"}, mesh.api_key)
    packed = json.loads(raw)["data"][0]
    assert status == 200 and set(packed) == {"index", "object", "embedding"}
    assert floats(base64.b64decode(packed["embedding"])) == pytest.approx(as_text.data[0].embedding, abs=1e-6)
    status, raw = await raw_http(rest, "POST", "/v1/embeddings", {"model": "embed", "input": [101, 10 ** 6]},
                                 mesh.api_key)
    error = json.loads(raw)["error"]
    assert status == 400 and error["message"].startswith("input[1]=1000000 is outside") and error["param"] == "input[1]"
    # The proto's own field, as the REST fuzzer sends it: 101.0 is the integer 101, 1.5 is refused naming it.
    status, raw = await raw_http(rest, "POST", "/v1/embeddings", {"model": "embed", "input_token_ids": [
        {"token_ids": [101.0, 102]}]}, mesh.api_key)
    assert status == 200 and json.loads(raw)["usage"]["prompt_tokens"] == 2, raw
    status, raw = await raw_http(rest, "POST", "/v1/embeddings", {"model": "embed", "input_token_ids": [
        {"token_ids": [1.5]}]}, mesh.api_key)
    assert status == 400 and json.loads(raw)["error"]["param"] == "input_token_ids[0].token_ids[0]", raw
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="embed", input="a", dimensions=64)
    assert "cannot shorten its vectors" in err.value.message
    cut = await client.embeddings.create(model=MATRYOSHKA, input="a", dimensions=128)
    assert len(cut.data[0].embedding) == 128


# ---- last: this test stops the module's worker ----

async def test_an_error_in_the_middle_of_a_stream_is_an_openai_error_event_then_the_end(mesh, rest):
    """A worker lost mid-stream: over REST an OpenAI error event after the chunks (no [DONE]), over gRPC the status
    after the chunks."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 480,
            "temperature": 0, "ignore_eos": True, "skip_cache": True, "stream": True}
    host, port = rest.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(f"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                 f"{len(data)}\r\nAuthorization: Bearer {mesh.api_key}\r\n\r\n".encode() + data)
    assert (await reader.readline()).split()[1] == b"200"
    grpc_stream = mesh.stub.StreamChatCompletion(chat(max_tokens=w.Int32Value(value=480), skip_cache=True),
                                                 metadata=mesh.auth)
    grpc_chunks = [await grpc_stream.read(), await grpc_stream.read()]
    events = []
    while len(events) < 3:
        line = (await reader.readline()).decode()
        if line.startswith("data: "):
            events.append(line.removeprefix("data: ").strip())
    for worker in list(mesh.workers):
        await worker.stop(0)
    rest_of_it = (await asyncio.wait_for(reader.read(), 30)).decode()
    writer.close()
    events += [e.removeprefix("data: ") for e in rest_of_it.split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])
    assert set(error) == {"error"} and error["error"]["message"] and error["error"]["type"]
    assert all("choices" in json.loads(e) for e in events[:-1]) and len(events) > 3
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        while (chunk := await grpc_stream.read()) is not grpc.aio.EOF:
            grpc_chunks.append(chunk)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and failed.value.details()
    assert grpc_chunks[0].choices[0].delta.role == "assistant"
    print(error, failed.value.details())
