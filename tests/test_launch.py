"""`llmserve run` as a user runs it: real processes, real SmolLM2 and MiniLM, buf curl, Ctrl-C.

One launch serves every check of this module (startup takes a few seconds once the converted weights are cached).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from llmserve.clients.client import Client
from tests.conftest import REPO
from tests.helpers.local_mesh import LocalMesh

QUESTION = "What is the capital of France?"


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    # fp32 for the exact "Paris" answer: dtype auto picks bf16 on AMX CPUs, where its first token is a near-tie.
    mesh = LocalMesh(tmp_path_factory.mktemp("launch"), worker={"lease_ttl_s": 3, "dtype": "float32"}).start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def client(launched):
    with Client(launched.gateway, launched.api_key, timeout_s=120) as c:
        yield c


def test_dev_key_file_is_private(launched):
    assert (launched.state / "dev-api-key").stat().st_mode & 0o777 == 0o600
    assert launched.api_key.startswith("lls_")


def test_internal_services_refuse_callers_outside_the_mesh(launched):
    """`llmserve run` gives its processes a mesh token: a caller that goes straight to the scheduler or a worker
    (skipping the gateway's keys, limits and budgets) is refused, while health checks stay open for probes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, task_pb2, worker_pb2, worker_pb2_grpc

    task = task_pb2.Task(request_id="direct", model_version="smollm2-135m-instruct-v1",
                         generate=task_pb2.GenerateInput(prompt="hi"))
    with grpc.insecure_channel(launched.address("scheduler")) as channel:
        call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Submit(
            iter([scheduler_pb2.SubmitRequest(task=task)]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "mesh token" in err.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(launched.address("worker")) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Serve(iter([worker_pb2.ServeRequest(task=task)]),
                                                                timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_greedy_chat_answers_paris_and_stream_equals_unary(client):
    unary = client.chat("smollm2", [("user", QUESTION)], temperature=0, max_tokens=32)
    text = unary.choices[0].message.content
    assert "Paris" in text
    assert unary.model == "smollm2-135m-instruct-v1"
    streamed = "".join(c.choices[0].delta.content for c in client.stream_chat(
        "smollm2", [("user", QUESTION)], temperature=0, max_tokens=32, skip_cache=True) if c.choices)
    assert streamed == text


def test_repeated_deterministic_request_is_a_cache_hit(client):
    request = dict(temperature=0, max_tokens=12)
    first, call1 = client.stub.CreateCompletion.with_call(_completion("The sky is", **request),
                                                          metadata=client.metadata)
    second, call2 = client.stub.CreateCompletion.with_call(_completion("The sky is", **request),
                                                           metadata=client.metadata)
    caches = [dict(c.initial_metadata())["x-llmserve-cache"] for c in (call1, call2)]
    assert caches == ["miss", "hit"] and first.choices == second.choices


def _completion(prompt, **params):
    from llmserve.clients.client import _params
    from llmserve.inference.v1 import inference_pb2 as pb
    return pb.CreateCompletionRequest(model="smollm2", prompt=prompt, **_params(**params))


def test_embeddings_of_similar_sentences_are_closer(client):
    response = client.embed("all-minilm-l6-v2", ["The cat sits on the mat.", "A kitten is sitting on a rug.",
                                                 "Quarterly revenue grew by eight percent."], skip_cache=True)
    a, b, c = (list(d.embedding) for d in response.data)
    cos = lambda x, y: sum(i * j for i, j in zip(x, y))  # noqa: E731 - unit vectors
    assert len(a) == 384 and cos(a, b) > cos(a, c) + 0.2


def test_buf_curl_with_reflection(launched):
    buf = shutil.which("buf") or REPO / ".llmserve" / "tools" / "node_modules" / ".bin" / "buf"
    if not pathlib.Path(buf).exists():
        pytest.skip("buf not installed (make test installs it)")
    base = [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    listed = subprocess.run([*base, "--list-methods", f"http://{launched.gateway}"], capture_output=True, text=True,
                            timeout=60)
    assert "llmserve.inference.v1.InferenceService/CreateCompletion" in listed.stdout
    # ignore_eos: at temperature 0.7 the first token is sometimes the end of text (completionTokens 1)
    body = '{"model": "smollm2", "prompt": "What is AI?", "max_tokens": 5, "temperature": 0.7, "ignore_eos": true}'
    called = subprocess.run([*base, "-H", f"authorization: Bearer {launched.api_key}", "-d", body,
                             f"http://{launched.gateway}/llmserve.inference.v1.InferenceService/CreateCompletion"],
                            capture_output=True, text=True, timeout=120)
    assert called.returncode == 0, called.stderr
    assert '"model": "smollm2-135m-instruct-v1"' in called.stdout and '"completionTokens": 5' in called.stdout
    denied = subprocess.run([*base, "-d", body,
                             f"http://{launched.gateway}/llmserve.inference.v1.InferenceService/CreateCompletion"],
                            capture_output=True, text=True, timeout=60)
    assert '"code": "unauthenticated"' in denied.stdout + denied.stderr


def test_killed_worker_is_restarted_and_serving_resumes(launched, client):
    """Requests sent while the worker restarts wait for it in the scheduler's queue (scheduler.worker_wait_s);
    one that finds no worker after that wait fails with UNAVAILABLE and is retried here."""
    (worker_pid,) = [pid for pid in _pids_with("llmserve.worker") if pid in _pids_with(str(launched.dir))]
    os.kill(worker_pid, signal.SIGKILL)
    started = time.monotonic()
    while True:
        try:
            response = client.complete("smollm2", "Hi", max_tokens=2, skip_cache=True)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 120, "the worker was not restarted"
            time.sleep(0.5)
    assert response.usage.completion_tokens == 2


def test_logs_hold_no_prompts_or_keys(launched, client):
    client.chat("smollm2", [("user", "my secret email is alice@example.com")], max_tokens=2, skip_cache=True)
    logs = "".join(p.read_text(errors="replace") for p in (launched.state / "logs").glob("*.log"))
    assert '"event": "request"' in logs
    for secret in (QUESTION, "alice@example.com", launched.api_key):
        assert secret not in logs


def test_ctrl_c_stops_everything_and_frees_the_ports(launched):
    marker = str(launched.dir)  # in the command line of every process it started, etcd and Redis included
    assert len(_pids_with(marker)) >= 6
    assert launched.stop() < 15
    assert launched.proc.returncode == 0
    time.sleep(0.3)
    assert _pids_with(marker) == []
    import socket
    for name in ("gateway", "scheduler", "worker", "registry", "etcd", "redis"):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", launched.ports[name])) != 0, f"{name} still listens"

