"""The mesh over mTLS (security.tls: auto, certificates from `llmserve certs`): registry, worker, scheduler and
gateway in this process, every hop TLS, with the mesh token as well. A completion works through the gateway; the
scheduler and the worker refuse plaintext callers, callers without a certificate and callers with a certificate of
another CA at the TLS handshake (UNAVAILABLE, not even health answers), and mesh members of the wrong role."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common import certs, tls
from llmserve.common.meshauth import mesh_metadata
from llmserve.dispatch.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"
TOKEN = "mesh-token-for-tls-tests"
MEMBER = mesh_metadata(TOKEN)


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory):
    mesh_dir, other_dir = tmp_path_factory.mktemp("tls"), tmp_path_factory.mktemp("other-ca")
    certs.ensure(mesh_dir)
    certs.ensure(other_dir, roles=["gateway", "scheduler", "client"])  # an intruder's CA, same role names
    return mesh_dir, other_dir


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir, tls_dirs):
    config = make_config()
    config.security.tls, config.security.tls_dir, config.security.mesh_token = "auto", str(tls_dirs[0]), TOKEN
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}", context_length=512)],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    yield mesh
    await mesh.stop()


def _credentials(ca_dir, cert_dir=None, role: str = "client") -> grpc.ChannelCredentials:
    """Trusting the CA of ca_dir, presenting the certificate of `role` from cert_dir (none without cert_dir)."""
    ca = certs.ca_path(ca_dir).read_bytes()
    if cert_dir is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=certs.key_path(cert_dir, role).read_bytes(),
                                        certificate_chain=certs.cert_path(cert_dir, role).read_bytes())


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)


async def _health(address: str, credentials) -> grpc.StatusCode:
    async with _channel(address, credentials) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


async def _internal_call(service: str, address: str, credentials, metadata=MEMBER) -> grpc.StatusCode:
    """The internal RPC a caller outside the mesh would want: SchedulerService/Submit or WorkerService/Serve."""
    async with _channel(address, credentials) as channel:
        if service == "scheduler":
            call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Submit(
                iter([scheduler_pb2.SubmitRequest()]), metadata=metadata, timeout=10)
        else:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Serve(
                iter([worker_pb2.ServeRequest()]), metadata=metadata, timeout=10)
        try:
            async for _ in call:
                break
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


def _internal(mesh) -> dict[str, str]:
    return {"scheduler": f"127.0.0.1:{mesh.scheduler.service.port}",
            "worker": f"127.0.0.1:{mesh.workers[0].service.port}"}


async def test_a_completion_works_through_the_gateway_over_tls(mesh, tls_dirs):
    request = pb.CreateCompletionRequest(model="tiny", prompt="Hello there", max_tokens=w.Int32Value(value=4),
                                         temperature=w.FloatValue(value=0.0), skip_cache=True)
    response = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)  # the helper's TLS channel
    assert response.model == TINY and response.usage.completion_tokens >= 1
    # A public client needs no certificate of its own: it trusts the CA and brings its API key.
    async with _channel(f"127.0.0.1:{mesh.gateway.service.port}", _credentials(tls_dirs[0])) as channel:
        again = await inference_pb2_grpc.InferenceServiceStub(channel).CreateCompletion(request, metadata=mesh.auth)
    assert again.choices[0].text == response.choices[0].text


async def test_the_gateway_refuses_plaintext_and_clients_that_distrust_its_ca(mesh, tls_dirs):
    address = f"127.0.0.1:{mesh.gateway.service.port}"
    assert await _health(address, _credentials(tls_dirs[0])) == grpc.StatusCode.OK
    assert await _health(address, None) == grpc.StatusCode.UNAVAILABLE
    assert await _health(address, _credentials(tls_dirs[1])) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["scheduler", "worker"])
async def test_internal_servers_refuse_callers_without_a_valid_certificate(mesh, tls_dirs, service):
    mesh_dir, other_dir = tls_dirs
    address = _internal(mesh)[service]
    refused = {
        "plaintext": None,
        "no client certificate": _credentials(mesh_dir),
        "a certificate of another CA": _credentials(mesh_dir, other_dir, "gateway" if service == "scheduler"
                                                    else "scheduler"),
    }
    for case, credentials in refused.items():
        # Refused in the TLS handshake: not even the open health service answers, let alone Submit or Serve.
        assert await _health(address, credentials) == grpc.StatusCode.UNAVAILABLE, case
        assert await _internal_call(service, address, credentials) == grpc.StatusCode.UNAVAILABLE, case
    assert await _health(address, _credentials(mesh_dir, mesh_dir, "client")) == grpc.StatusCode.OK


async def test_internal_servers_serve_only_their_callers_role_and_still_want_the_mesh_token(mesh, tls_dirs):
    mesh_dir = tls_dirs[0]
    scheduler, worker = _internal(mesh)["scheduler"], _internal(mesh)["worker"]
    as_role = {role: _credentials(mesh_dir, mesh_dir, role) for role in ("gateway", "scheduler", "worker", "client")}
    # Mesh members of another role: their certificate is good, but only gateways submit and only the scheduler
    # dispatches (a worker's or an operator's certificate cannot skip the gateway's keys, limits and budgets).
    for role in ("worker", "client", "scheduler"):
        assert await _internal_call("scheduler", scheduler, as_role[role]) == grpc.StatusCode.PERMISSION_DENIED
    for role in ("gateway", "worker", "client"):
        assert await _internal_call("worker", worker, as_role[role]) == grpc.StatusCode.PERMISSION_DENIED
    # The right role without the mesh token: the token is still checked alongside TLS.
    assert await _internal_call("scheduler", scheduler, as_role["gateway"], ()) == grpc.StatusCode.UNAUTHENTICATED
    assert await _internal_call("worker", worker, as_role["scheduler"], ()) == grpc.StatusCode.UNAUTHENTICATED
    # The right role with the token gets past both checks (an empty task is then the caller's mistake).
    assert await _internal_call("scheduler", scheduler, as_role["gateway"]) == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_registry_wants_a_certificate_too(mesh, tls_dirs):
    address = f"127.0.0.1:{mesh.registry.service.port}"
    assert await _health(address, _credentials(tls_dirs[0])) == grpc.StatusCode.UNAVAILABLE
    assert await _health(address, _credentials(tls_dirs[0], tls_dirs[0])) == grpc.StatusCode.OK


def test_files_of_each_mode(tmp_path):
    from llmserve.common.config import SecurityConfig
    assert tls.files(SecurityConfig(), "gateway") is None
    auto = tls.files(SecurityConfig(tls="auto", tls_dir=str(tmp_path)), "worker")
    assert auto == tls.TlsFiles(tmp_path / "worker.pem", tmp_path / "worker-key.pem", tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="llmserve certs"):
        tls.server_credentials(SecurityConfig(tls="auto", tls_dir=str(tmp_path)), "worker")
    with pytest.raises(ValueError, match="security.tls_key, security.tls_ca"):
        SecurityConfig(tls="on", tls_cert="c.pem").validate()
    on = SecurityConfig(tls="True")  # YAML's bare `tls: on`
    on.tls_cert, on.tls_key, on.tls_ca = "c", "k", "ca"
    on.validate()
    assert on.tls == "on"


@pytest.mark.parametrize("server_name, served", [("scheduler", True), ("", False)])
async def test_a_discovered_scheduler_at_an_address_no_certificate_names_needs_its_server_name(mesh, server_name,
                                                                                              served):
    # As in Kubernetes: a replica registers a pod IP (here 127.0.0.2, which certificates do not name); gateways
    # check its certificate against security.tls_scheduler_server_name instead of that address.
    import copy
    import socket

    from llmserve.gateway.app import GatewayApp
    from llmserve.scheduler.app import SchedulerApp
    if mesh.scheduler.registration is not None:
        await mesh.scheduler.registration.stop()  # only the replica is discovered
    config = copy.deepcopy(mesh.config)
    config.scheduler.host, config.scheduler.port, config.scheduler.scheduler_id = "127.0.0.2", 0, "replica"
    replica = SchedulerApp(config)
    await replica.start()
    with socket.socket() as sock:  # the static address: a closed port
        sock.bind(("127.0.0.1", 0))
        config.gateway.scheduler_address = f"127.0.0.1:{sock.getsockname()[1]}"
    config.gateway.port, config.gateway.scheduler_wait_s = 0, 3.0
    config.security.tls_scheduler_server_name = server_name
    gateway = GatewayApp(config)
    port = await gateway.start()
    channel = tls.aio_channel(f"127.0.0.1:{port}", config.security, "client")
    try:
        await gateway.view.keys.wait_for(lambda s: len(s) >= 1, 5)
        await gateway.view.tenants.wait_for(lambda s: "test-tenant" in s, 5)
        for _ in range(100):  # the replica has dialled the worker (over mTLS too)
            if any(conn.is_ready for conn in replica.dispatcher.workers.values()):
                break
            await asyncio.sleep(0.1)
        call = inference_pb2_grpc.InferenceServiceStub(channel).CreateCompletion(
            pb.CreateCompletionRequest(model="tiny", prompt="hi", max_tokens=w.Int32Value(value=2), skip_cache=True),
            metadata=mesh.auth, timeout=30)
        if served:
            assert (await call).choices
        else:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await gateway.stop(0)
        await replica.stop(0)
