"""A pool of workers under `llmserve run`: launch.workers processes on their own ports, per-worker model sets, and
the x-llmserve-worker trailer naming the worker that served each request; launch.schedulers scheduler replicas, of
which one may die (tiny models: text does not matter)."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import yaml

from llmserve.clients.client import Client, _params
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.local_mesh import LocalMesh

TINY, TINY_B = "tiny-llama-v1", "tiny-llama-b"


def _models_file(path, tiny_llama_dir):
    def version(name):
        return {"version": name, "family": "tiny", "kind": "MODEL_KIND_GENERATE", "engine": "torch",
                "weights_source": f"file:{tiny_llama_dir}", "context_length": 2048}
    path.write_text(yaml.safe_dump({"versions": [version(TINY), version(TINY_B)],
                                    "aliases": [{"name": "tiny", "targets": [{"version": TINY, "weight": 100}]},
                                                {"name": "tiny-b", "targets": [{"version": TINY_B, "weight": 100}]}]}))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_llama_dir):
    directory = tmp_path_factory.mktemp("pool")
    mesh = LocalMesh(directory, models_file=_models_file(directory / "models.yaml", tiny_llama_dir), workers=2,
                     worker={"models": [TINY], "lease_ttl_s": 3}, worker_models=[[TINY], [TINY, TINY_B]],
                     schedulers=2).start()
    yield mesh
    mesh.stop()


def _worker_of(call) -> str:
    return dict(call.trailing_metadata()).get("x-llmserve-worker", "")


def test_launch_starts_each_worker_on_its_port_with_its_models(pool):
    banner = "".join(pool.output)
    assert f"127.0.0.1:{pool.ports['worker']}   models: {TINY}" in banner
    assert f"127.0.0.1:{pool.ports['worker-2']}   models: {TINY}, {TINY_B}" in banner
    assert pool.pid("worker") and pool.pid("worker-2") and pool.pid("worker") != pool.pid("worker-2")


def test_responses_name_the_worker_that_served_them(pool):
    host = socket.gethostname()
    with Client(pool.gateway, pool.api_key, timeout_s=60) as client:
        request = pb.CreateCompletionRequest(model="tiny-b", prompt="hello", **_params(max_tokens=3))
        _, call = client.stub.CreateCompletion.with_call(request, metadata=client.metadata, timeout=60)
        assert _worker_of(call) == f"{host}-{pool.ports['worker-2']}"  # only worker 2 serves tiny-b
        stream = client.stub.StreamCompletion(
            pb.StreamCompletionRequest(model="tiny-b", prompt="hi", **_params(max_tokens=3)),
            metadata=client.metadata, timeout=60)
        assert list(stream)
        assert _worker_of(stream) == f"{host}-{pool.ports['worker-2']}"
        seen = set()
        for i in range(6):
            _, call = client.stub.CreateCompletion.with_call(
                pb.CreateCompletionRequest(model="tiny", prompt=f"request {i}", **_params(max_tokens=2)),
                metadata=client.metadata, timeout=60)
            seen.add(_worker_of(call))
        assert seen <= {f"{host}-{pool.ports['worker']}", f"{host}-{pool.ports['worker-2']}"} and seen


def test_launch_starts_the_schedulers_and_serves_through_one_dying(pool):
    banner = "".join(pool.output)
    for name in ("scheduler", "scheduler-2"):
        assert f"scheduler        127.0.0.1:{pool.ports[name]}" in banner
    assert pool.pid("scheduler") and pool.pid("scheduler-2") and pool.pid("scheduler") != pool.pid("scheduler-2")
    request = pb.CreateCompletionRequest(model="tiny", prompt="hello", **_params(max_tokens=2, skip_cache=True))
    with Client(pool.gateway, pool.api_key, timeout_s=60) as client:
        client.stub.CreateCompletion(request, metadata=client.metadata, timeout=60)
        os.kill(pool.pid("scheduler-2"), signal.SIGKILL)  # the gateway moves its tasks to scheduler 1
        for _ in range(10):
            assert client.stub.CreateCompletion(request, metadata=client.metadata, timeout=60).choices


def test_launch_settings_from_the_environment():
    from llmserve.common.config import load_config

    config = load_config(env={"LLMSERVE_LAUNCH__WORKERS": "3", "LLMSERVE_LAUNCH__WORKER_MODELS": "a b,c"})
    assert config.launch.ports(config.worker.port) == [50061, 50062, 50063]
    assert [config.launch.models(i, ["d"]) for i in range(3)] == [["a", "b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match="launch.workers=0 must be >= 1"):
        load_config(env={"LLMSERVE_LAUNCH__WORKERS": "0"})
    with pytest.raises(ValueError, match="distinct ports"):
        load_config(env={"LLMSERVE_LAUNCH__WORKERS": "2", "LLMSERVE_LAUNCH__WORKER_PORTS": "7,7"})
