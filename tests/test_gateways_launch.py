"""launch.gateways: several gateway processes behind one listening address (HAProxy), as `make run` starts them."""

from __future__ import annotations

import collections
import os
import pathlib
import shutil
import signal
import subprocess
import time

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.clients.launcher import haproxy_config
from llmserve.common.config import LaunchConfig, load_config
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.local_mesh import LocalMesh

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REQUEST = pb.CreateCompletionRequest(model="smollm2", prompt="Name a colour.", max_tokens=w.Int32Value(value=2),
                                     temperature=w.FloatValue(value=0.0))


def test_launch_gateways_setting_is_validated_and_read_from_the_environment(tmp_path):
    config = load_config(None, env={"LLMSERVE_LAUNCH__GATEWAYS": "3"})
    assert config.launch.gateways == 3
    for bad in (LaunchConfig(gateways=0), LaunchConfig(gateways=1, gateway_ports=[9000, 9001]),
                LaunchConfig(gateways=2, gateway_ports=[9000, 9000])):
        with pytest.raises(ValueError, match="launch.gateway"):
            bad.validate(50052)


@pytest.mark.parametrize("tls_enabled", [False, True])
def test_the_haproxy_config_is_valid_for_haproxy(tmp_path, tls_enabled):
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail("haproxy is not installed: apt-get install haproxy (deploy/local/install-system-deps.sh)")
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config("127.0.0.1", 50051, [40001, 40002], tls_enabled))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = path.read_text()
    assert ("mode tcp" in text and "proto h2" not in text) if tls_enabled else ("mode http" in text and
                                                                               text.count("proto h2") == 3)


def _served(log: pathlib.Path) -> int:
    return sum('"event": "request"' in line and '"code": "OK"' in line for line in log.read_text().splitlines())


def test_two_gateways_behind_one_address_share_the_requests_and_survive_one_dying(tmp_path):
    with LocalMesh(tmp_path, gateways=2, launch_gateways=True) as mesh:
        assert mesh.front not in mesh.gateways and len(mesh.gateways) == 2
        metadata = (("authorization", f"Bearer {mesh.api_key}"),)
        with grpc.insecure_channel(mesh.front) as channel:  # one connection: HAProxy balances its requests
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.CreateCompletion(REQUEST, metadata=metadata, timeout=120)  # generates; the rest are cache hits
            for _ in range(40):
                stub.CreateCompletion(REQUEST, metadata=metadata, timeout=30)
        time.sleep(1)  # services write their log lines in batches (within 0.2 s)
        logs = mesh.state / "logs"
        served = [_served(logs / "gateway1.log"), _served(logs / "gateway2.log")]
        assert sum(served) >= 41 and min(served) >= 15, served  # round robin per request, not per connection

        os.kill(mesh.pid("gateway-2"), signal.SIGKILL)
        time.sleep(1.5)  # HAProxy checks every 500 ms and takes a gateway out after 2 failed checks
        codes: collections.Counter[str] = collections.Counter()
        with grpc.insecure_channel(mesh.front) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(30):
                try:
                    stub.CreateCompletion(REQUEST, metadata=metadata, timeout=30)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
        assert codes == {"OK": 30}, codes
