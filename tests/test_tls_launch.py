"""`llmserve run` with security.tls: auto, as a user turns it on: it writes a CA and the services' certificates on
its first start and runs every hop over mTLS, the REST sidecar as HTTPS. Real processes, the tiny Llama."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import yaml

from llmserve.clients.client import Client
from llmserve.common import certs
from tests.helpers.local_mesh import LocalMesh

VERSION = "tiny-llama-v1"


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_llama_dir):
    directory = tmp_path_factory.mktemp("tls-launch")
    models = directory / "models.yaml"
    models.write_text(yaml.safe_dump({
        "versions": [{"version": VERSION, "family": "tiny", "kind": "MODEL_KIND_GENERATE",
                      "weights_source": f"file:{tiny_llama_dir}", "context_length": 512}],
        "aliases": [{"name": "tiny", "targets": [{"version": VERSION, "weight": 100}]}]}))
    mesh = LocalMesh(directory, models_file=models, worker={"models": [VERSION], "dtype": "float32",
                                                            "num_threads": 1, "num_kv_blocks": 64})
    config = yaml.safe_load(mesh.config_path.read_text())
    config["security"] = {"tls": "auto", "tls_dir": str(directory / "tls")}
    mesh.config_path.write_text(yaml.safe_dump(config))
    mesh.tls_dir = directory / "tls"
    yield mesh.start()
    mesh.stop()


def test_first_start_writes_the_ca_and_a_certificate_per_service(launched):
    for role in certs.MESH_ROLES:
        assert certs.cert_path(launched.tls_dir, role).exists()
        assert certs.key_path(launched.tls_dir, role).stat().st_mode & 0o777 == 0o600
    assert (launched.tls_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert "tls: wrote ca, gateway" in "".join(launched.output)


def test_completions_over_grpc_tls_and_https(launched):
    ca = certs.ca_path(launched.tls_dir)
    with Client(launched.gateway, launched.api_key, timeout_s=60,
                credentials=grpc.ssl_channel_credentials(ca.read_bytes())) as client:
        answer = client.complete("tiny", "Hello", max_tokens=3, temperature=0, ignore_eos=True)
    assert answer.usage.completion_tokens == 3
    if not _rest_is_up(launched):
        pytest.skip("the REST sidecar is not built here (`make rest`)")
    request = urllib.request.Request(f"https://127.0.0.1:{launched.ports['rest']}/v1/completions", method="POST",
                                     headers={"Authorization": f"Bearer {launched.api_key}",
                                              "Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 3}).encode())
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=60) as reply:
        assert json.load(reply)["usage"]["completion_tokens"] == 3


def test_plaintext_is_refused_everywhere(launched):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    for service in ("gateway", "scheduler", "worker", "registry"):
        with grpc.insecure_channel(launched.address(service)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, service
    if _rest_is_up(launched):  # Go answers plain HTTP on a TLS port with 400 and no API
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{launched.ports['rest']}/v1/models", timeout=10)
        assert err.value.code == 400


def _rest_is_up(launched) -> bool:
    """The sidecar runs where it is built (`make rest`); without Go the mesh serves gRPC only."""
    return "rest: OpenAI-compatible API on https://" in "".join(launched.output)


def test_the_health_probe_speaks_the_mesh_tls(launched):
    probe = subprocess.run([sys.executable, "-m", "llmserve.clients.cli", "--config", str(launched.config_path),
                            "health", launched.address("worker")], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == "SERVING", probe.stderr
