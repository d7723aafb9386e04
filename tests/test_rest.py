"""The OpenAI-compatible REST sidecar (deploy/rest), driven by the official `openai` SDK, unmodified, against a
real mesh: `llmserve run` with SmolLM2 and MiniLM answering, the sidecar built from the protos with grpc-gateway.

One mesh serves the whole module. Generations are greedy and short to stay fast. Raw HTTP checks (malformed
bodies, limits, routes) use urllib. The Go tests of the sidecar (deploy/rest/*_test.go: Retry-After, every
status mapping, mid-stream errors, metadata filtering, against a fake gateway) run from here too.
"""

from __future__ import annotations

import json
import math
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.conftest import REPO
from tests.helpers.local_mesh import LocalMesh

openai = pytest.importorskip("openai", reason="the openai SDK is part of the dev extra (pip install -e '.[dev]')")

QUESTION = "What is the capital of France?"
BUILD = ["bash", str(REPO / "deploy" / "rest" / "build.sh")]


def _build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BUILD, *args], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sidecar_binary():
    built = _build()  # about a second when nothing changed
    if built.returncode == 2:  # no Go toolchain here (deploy/rest/install-deps.sh installs it with apt)
        pytest.skip("the REST sidecar cannot be built on this machine: " + built.stderr.strip().replace("\n", " "))
    assert built.returncode == 0, f"deploy/rest/build.sh failed:\n{built.stdout}\n{built.stderr}"


# The sidecar's limits for this module's mesh: short enough that tests can outlast them.
REST_LIMITS = {"read_header_timeout_s": 1.0, "write_timeout_s": 1.0, "max_concurrent_requests": 3}


@pytest.fixture(scope="module")
def mesh(sidecar_binary, tmp_path_factory):
    # fp32: these tests compare exact greedy text; dtype auto picks bf16 on AMX CPUs, where the first token of the
    # "capital of France" answer is a near-tie (0.09 apart in fp32) that bf16 weights can flip.
    m = LocalMesh(tmp_path_factory.mktemp("rest"), worker={"dtype": "float32"})
    config = yaml.safe_load(m.config_path.read_text())
    config["rest"].update(REST_LIMITS)
    m.config_path.write_text(yaml.safe_dump(config))
    m.start()
    try:
        assert "rest: OpenAI-compatible API on" in "".join(m.output), "".join(m.output)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=mesh.rest_url, api_key=mesh.api_key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def base(mesh) -> str:
    return mesh.rest_url.removesuffix("/v1")


def http(method: str, url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw request."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"null")


def assert_openai_error(body: dict) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["message"] and error["type"], body
    return error


# ---- serving ----

def test_health_is_200_when_the_mesh_serves(base):
    status, headers, body = http("GET", f"{base}/health")
    assert status == 200 and body["status"] == "ok"


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert "smollm2" in ids and "all-minilm-l6-v2" in ids
    assert "smollm2-135m-instruct-v1" in ids
    model = client.models.retrieve("smollm2")
    assert model.id == "smollm2" and model.owned_by == "llmserve" and isinstance(model.created, int)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_with_a_string_prompt(client):
    r = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.model == "smollm2-135m-instruct-v1"
    assert isinstance(r.created, int) and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 4 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_with_a_list_of_prompts(client):
    r = client.completions.create(model="smollm2", prompt=["The sky is", "Water is"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text for c in r.choices)
    single = client.completions.create(model="smollm2", prompt="Water is", max_tokens=3, temperature=0)
    assert r.choices[1].text == single.choices[0].text


def test_chat_answers_paris_with_mesh_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16)
    r = raw.parse()
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and isinstance(r.created, int) and isinstance(r.usage.prompt_tokens, int)
    assert raw.headers["x-llmserve-model-version"] == "smollm2-135m-instruct-v1"
    assert raw.headers["x-llmserve-cache"] in ("hit", "miss") and raw.headers["x-request-id"]
    assert not [h for h in raw.headers if h.lower().startswith("grpc-")]


def test_responses_name_their_worker_in_x_llmserve_worker_only(mesh, client):
    worker = f"{socket.gethostname()}-{mesh.ports['worker']}"  # worker.worker_id's default, <hostname>-<port>
    fresh = {"skip_cache": True}
    completion = client.completions.with_raw_response.create(model="smollm2", prompt="Roses are", max_tokens=2,
                                                             temperature=0, extra_body=fresh)
    # A stream's headers are written before its first chunk: the gateway names the worker once it is dispatched.
    stream = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, temperature=0, stream=True,
        extra_body=fresh)
    chunks = [c.model_dump_json() for c in stream.parse()]
    embedding = client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input="a worker",
                                                           extra_body=fresh)
    for raw, body in ((completion, completion.text), (stream, "".join(chunks)), (embedding, embedding.text)):
        assert raw.headers.get_list("x-llmserve-worker") == [worker], raw.headers
        assert all(worker not in v for k, v in raw.headers.items() if k != "x-llmserve-worker")
        assert worker not in body
    # A response-cache hit ran on no worker and names none, as over gRPC.
    prompt = f"Cached at {time.time()}:"
    first, second = (client.completions.with_raw_response.create(model="smollm2", prompt=prompt, max_tokens=2,
                                                                 temperature=0) for _ in range(2))
    assert first.headers["x-llmserve-cache"] == "miss" and first.headers["x-llmserve-worker"] == worker
    assert second.headers["x-llmserve-cache"] == "hit" and "x-llmserve-worker" not in second.headers


def test_chat_stream_equals_unary_and_carries_no_usage_unasked(client):
    messages = [{"role": "user", "content": QUESTION}]
    unary = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, extra_body={"skip_cache": True}))
    assert len(chunks) > 2, "a live (uncached) stream sends one chunk per text delta"
    assert all(c.object == "chat.completion.chunk" and c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == unary.choices[0].message.content
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16,
        stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream(client):
    unary = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, extra_body={"skip_cache": True}))
    assert len(chunks) > 1 and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == unary.choices[0].text
    assert chunks[-1].choices[0].finish_reason == unary.choices[0].finish_reason


def test_embeddings_string_and_list(client):
    one = client.embeddings.create(model="all-minilm-l6-v2", input="a cat")  # the SDK asks for base64 and decodes
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert one.model == "all-minilm-l6-v2-v1" and one.usage.prompt_tokens > 0
    batch = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a kitten"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1] and all(len(d.embedding) == 384 for d in batch.data)
    assert math.isclose(math.fsum(x * x for x in batch.data[0].embedding), 1.0, rel_tol=1e-3)
    assert max(abs(a - b) for a, b in zip(one.data[0].embedding, batch.data[0].embedding)) < 1e-5


def test_max_completion_tokens_and_ignore_eos(client):
    messages = [{"role": "user", "content": "Answer with one word: is water wet?"}]
    short = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    free = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
    forced = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                            extra_body={"ignore_eos": True})
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 24
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 24


def test_stop_as_a_string_and_null_optional_fields(client):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16, stop="Paris")
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith("The capital")
    # Explicit nulls (stop=None) and the remaining OpenAI knobs: n, seed, user.
    r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0.8, max_tokens=4, n=2,
                                       seed=7, user="alice", stop=None)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)


def test_a_client_that_leaves_a_stream_cancels_the_generation(mesh, client):
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=200,
        stream=True, extra_body={"ignore_eos": True, "skip_cache": True})
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    deadline = time.monotonic() + 20
    log = mesh.state / "logs" / "rest.log"
    while "stream_error=CLIENT_CLOSED" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stream_error=CLIENT_CLOSED" in log.read_text()
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].message.content


# ---- errors, as the SDK's exception classes ----

def test_a_bad_key_is_an_authentication_error(mesh):
    with openai.OpenAI(base_url=mesh.rest_url, api_key="lls_not-a-real-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
    assert info.value.status_code == 401


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 404 and "gpt-17" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_temperature_out_of_range_is_a_bad_request_naming_it(client, stream):
    with pytest.raises(openai.BadRequestError) as info:
        result = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                                temperature=5, max_tokens=2, stream=stream)
        list(result) if stream else None
    assert info.value.status_code == 400 and "temperature" in info.value.message
    assert info.value.param == "temperature"


def test_raw_http_errors_and_the_sidecar_keeps_serving(mesh, base):
    url, key = mesh.rest_url, mesh.api_key
    status, _, body = http("POST", f"{url}/chat/completions", b'{"model": "smollm2", "messages": [', key)
    assert status == 400 and "JSON" in assert_openai_error(body)["message"]

    status, _, body = http("POST", f"{url}/completions",
                           json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": "abc"}).encode(), key)
    error = assert_openai_error(body)
    assert status == 400 and error["param"] == "max_tokens" and "max_tokens" in error["message"]

    big = json.dumps({"model": "smollm2", "prompt": "a" * (4 * 1024 * 1024 + 1)}).encode()
    status, _, body = http("POST", f"{url}/completions", big, key)
    assert status == 413 and assert_openai_error(body)["code"] == "request_too_large"

    status, _, body = http("POST", f"{url}/no/such/route", b"{}", key)
    assert status == 404 and assert_openai_error(body)
    status, _, body = http("GET", f"{url}/chat/completions", None, key)
    assert status == 405 and assert_openai_error(body)

    # Unknown JSON fields are ignored (as vLLM does), and the sidecar still serves after all of the above.
    status, _, body = http("POST", f"{url}/completions", json.dumps(
        {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "logprobs": None,
         "presence_penalty": 0, "some_future_field": {"x": 1}}).encode(), key)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    assert http("GET", f"{base}/health")[0] == 200


def test_access_log_has_one_line_per_request_and_no_secrets(mesh, client):
    client.models.list()
    log = (mesh.state / "logs" / "rest.log").read_text()
    assert "GET /v1/models 200" in log and "POST /v1/chat/completions 200" in log
    assert mesh.api_key not in log and QUESTION not in log and "Bearer" not in log


def test_go_tests_of_the_sidecar(sidecar_binary):
    """deploy/rest/sidecar_test.go against a fake gateway: Retry-After, status mapping, mid-stream errors."""
    result = _build("--test")
    if result.returncode == 2:  # a prebuilt binary, but no toolchain to compile the tests with
        pytest.skip("no Go toolchain: " + result.stderr.strip().replace("\n", " "))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rate_limits_are_429_and_an_impossible_request_is_not_retried(mesh):
    import grpc
    import openai

    from llmserve.admin.v1 import tenants_pb2 as tpb
    from llmserve.clients.admin import tenant_stub
    with grpc.insecure_channel(mesh.address("registry")) as channel:
        admin = tenant_stub(channel, (mesh.state / "admin-key").read_text().strip())
        admin.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name="rest-limited", requests_per_minute=1,
                                                                     tokens_per_minute=200)))
        key = admin.CreateApiKey(tpb.CreateApiKeyRequest(tenant="rest-limited")).key
    time.sleep(0.5)  # the gateway learns the key through its etcd watch
    limited = openai.OpenAI(base_url=mesh.rest_url, api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:  # needs more tokens than the whole per-minute limit
        limited.completions.create(model="smollm2", prompt="hi", max_tokens=500)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in err.value.response.headers
    limited.completions.create(model="smollm2", prompt="hi", max_tokens=2)  # the one request of this minute
    with pytest.raises(openai.RateLimitError) as err:
        limited.completions.create(model="smollm2", prompt="hi", max_tokens=2)
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert "requests per minute" in err.value.message


# ---- what one client can hold: bearer check, timeouts, concurrency (deploy/rest/limits.go) ----

def _raw(mesh) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mesh.ports["rest"]), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_no_bearer_token_is_401_before_the_body_is_read(mesh):
    # A 3 MiB body (under the 4 MiB limit) that starts as invalid JSON and whose rest never comes: the answer
    # cannot wait for it, and cannot come from parsing it.
    with _raw(mesh) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 3145728\r\n\r\n" + b"{" * 65536)
        started = time.monotonic()
        sock.settimeout(5)
        status, headers, body = _read_response(sock)
        elapsed = time.monotonic() - started
    error = assert_openai_error(json.loads(body))
    assert status == 401 and error["code"] == "missing_api_key" and error["type"] == "authentication_error"
    assert elapsed < 2, f"401 took {elapsed:.2f}s"
    assert headers.get("connection") == "close" and headers["www-authenticate"].startswith("Bearer")

    # A whole invalid body without a key is 401 too (not 400), and so is a GET; a malformed header likewise.
    url = mesh.rest_url
    status, _, body = http("POST", f"{url}/completions", b"{" * (200 * 1024))
    assert status == 401 and assert_openai_error(body)["code"] == "missing_api_key"
    assert http("GET", f"{url}/models")[0] == 401
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Basic {mesh.api_key}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    assert http("GET", f"{url}/models", key=mesh.api_key)[0] == 200


def test_a_slowloris_client_is_cut_off_after_the_header_timeout_while_others_are_served(mesh, client):
    limit = REST_LIMITS["read_header_timeout_s"]
    headers = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mesh.api_key}\r\n"
               f"X-Pad: {'a' * 400}\r\n\r\n").encode()
    closed_after = None
    with _raw(mesh) as sock:
        started = time.monotonic()
        served = False
        for i in range(len(headers)):
            try:
                sock.sendall(headers[i:i + 1])
                if select.select([sock], [], [], 0.05)[0] and not sock.recv(1):
                    closed_after = time.monotonic() - started
                    break
            except OSError:  # reset or broken pipe: closed by the sidecar
                closed_after = time.monotonic() - started
                break
            if not served and i == 5:  # meanwhile, a normal request is served
                assert [m.id for m in client.models.list()]
                served = True
            if time.monotonic() - started > limit + 5:
                break
    assert served
    assert closed_after is not None, f"a client trickling its headers was not cut off in {limit + 5}s"
    assert limit * 0.8 <= closed_after <= limit + 3, closed_after


def test_a_stream_longer_than_the_write_timeout_is_not_cut(client):
    started = time.monotonic()
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=64, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "skip_cache": True}))
    elapsed = time.monotonic() - started
    assert chunks[-1].usage.completion_tokens == 64 and chunks[-2].choices[0].finish_reason == "length"
    assert elapsed > REST_LIMITS["write_timeout_s"], f"the stream took only {elapsed:.2f}s: it proves nothing"


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after(mesh, base, client):
    limit = REST_LIMITS["max_concurrent_requests"]
    streams = []
    try:
        for _ in range(limit):
            stream = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=200,
                stream=True, extra_body={"ignore_eos": True, "skip_cache": True})
            streams.append(stream)
            next(iter(stream))  # its first chunk: the request is in flight
        status, headers, body = http("GET", f"{mesh.rest_url}/models", key=mesh.api_key)
        assert status == 503 and headers["Retry-After"] == "1", (status, headers, body)
        assert assert_openai_error(body)["code"] == "server_overloaded"
        assert http("GET", f"{base}/health")[0] == 200  # probes are not counted
    finally:
        for stream in streams:
            stream.close()
    deadline = time.monotonic() + 20
    while (status := http("GET", f"{mesh.rest_url}/models", key=mesh.api_key)[0]) == 503:
        assert time.monotonic() < deadline, "the slots of closed streams did not come back"
        time.sleep(0.1)
    assert status == 200


# ---- logprobs, echo and token-id prompts (what lm-evaluation-harness sends) ----

def _smollm2_logprobs(ids: list[int]):
    import torch

    from llmserve.worker.models import load_generation_model
    from tests.helpers.tiny_models import SMOLLM2_SOURCE, model_cache_dir

    model, _ = load_generation_model(SMOLLM2_SOURCE, model_cache_dir())
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_of_batched_token_id_prompts_score_like_hf(client, max_tokens):
    from tests.helpers.tiny_models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    texts = ["The capital of France is Paris", "Water boils at 100 degrees"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    r = client.completions.create(model="smollm2", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == sum(map(len, prompts))
    truth = _smollm2_logprobs(prompts[0] + ([] if not max_tokens else [tokenizer.convert_tokens_to_ids(
        r.choices[0].logprobs.tokens[-1])]))
    for choice, text, ids in zip(r.choices, texts, prompts):
        lp = choice.logprobs
        assert choice.text.startswith(text) and len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        assert "".join(lp.tokens) == choice.text
        assert all(value <= 0 and token in top for token, value, top in
                   zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]))
    scored = r.choices[0].logprobs
    for i in range(1, len(prompts[0])):
        assert abs(scored.token_logprobs[i] - truth[i - 1, prompts[0][i]].item()) < 1e-3
    if max_tokens:  # greedy, as lm-eval's is_greedy reads it: the sampled token is the top one
        assert scored.token_logprobs[-1] == max(scored.top_logprobs[-1].values())


def test_a_single_token_id_prompt_equals_its_text_and_bad_ids_name_the_index(client, mesh, base):
    from tests.helpers.tiny_models import smollm2_tokenizer

    ids = smollm2_tokenizer().encode("The sky is", add_special_tokens=False)
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt=[ids, [1, 99999]], max_tokens=1)
    assert "prompt[1][1]=99999 is outside the vocabulary" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt=[5, 99999], max_tokens=1)
    assert "prompt[1]=99999 is outside the vocabulary" in err.value.message
    status, _, body = http("POST", f"{base}/v1/completions", json.dumps(
        {"model": "smollm2", "prompt": [1, "x"]}).encode(), mesh.api_key)
    assert status == 400 and assert_openai_error(body)["param"] == "prompt[1]"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="x", logprobs=21)
    assert "logprobs=21 is out of range" in err.value.message


def test_completion_logprobs_stream_equal_unary(client):
    kwargs = dict(model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    unary = client.completions.create(**kwargs).choices[0].logprobs
    chunks = list(client.completions.create(**kwargs, stream=True, extra_body={"skip_cache": True}))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == unary.tokens and values == pytest.approx(unary.token_logprobs, abs=1e-5)
    assert len(unary.tokens) == 5 and all(1 <= len(top) <= 3 for top in unary.top_logprobs)


def test_chat_logprobs_unary_and_stream(client):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)  # greedy
    assert all(bytes(e.bytes) == e.token.encode() for e in content if e.bytes is not None and
               not e.token.startswith("bytes:"))
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=6,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body={"skip_cache": True}))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]
    plain = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None
