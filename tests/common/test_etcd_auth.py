"""etcd with authentication, as the Kubernetes manifests run it: TLS with client certificates (etcd
--client-cert-auth), and a user with a password. The services' client (common/etcd.py) gets in with what EtcdConfig
names and nobody gets in without it."""

from __future__ import annotations

import asyncio

import aetcd
import grpc
import pytest
from aetcd import rpc

from llmserve.common import certs
from llmserve.common import etcd as etcd_mod
from llmserve.common.config import EtcdConfig
from tests.helpers.servers import Server, etcd_binary, running

pytestmark = pytest.mark.timeout(60)


def _etcd(tmp_path, scheme: str, extra: list[str]) -> Server:
    from llmserve.common.net import free_port
    port, peer = free_port(), free_port()
    data = tmp_path / "etcd"
    return Server([etcd_binary(), "--data-dir", str(data), "--name", "auth",
                   "--listen-client-urls", f"{scheme}://127.0.0.1:{port}",
                   "--advertise-client-urls", f"{scheme}://127.0.0.1:{port}",
                   "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-cluster", f"auth=http://127.0.0.1:{peer}", "--log-level", "error", *extra],
                  port, str(data))


async def _roundtrip(cfg: EtcdConfig) -> bytes:
    client = etcd_mod.connect(cfg)
    try:
        await client.put(b"/auth-test/k", b"v")
        found = await client.get(b"/auth-test/k")
        return found.value
    finally:
        await client.close()


async def test_tls_with_client_certificates(tmp_path):
    tls_dir, other = tmp_path / "tls", tmp_path / "other"
    certs.ensure(tls_dir, roles=["etcd", "gateway"])
    certs.ensure(other, roles=["gateway"])
    server = _etcd(tmp_path, "https", ["--cert-file", str(certs.cert_path(tls_dir, "etcd")),
                                       "--key-file", str(certs.key_path(tls_dir, "etcd")),
                                       "--client-cert-auth", "--trusted-ca-file", str(certs.ca_path(tls_dir))])
    with running(server):
        base = dict(host="127.0.0.1", port=server.port, timeout_s=3.0, ca_file=str(certs.ca_path(tls_dir)))
        good = EtcdConfig(**base, cert_file=str(certs.cert_path(tls_dir, "gateway")),
                          key_file=str(certs.key_path(tls_dir, "gateway")))
        assert await _roundtrip(good) == b"v"
        refused = [
            EtcdConfig(host="127.0.0.1", port=server.port, timeout_s=3.0),  # plaintext
            EtcdConfig(**base),  # TLS without a client certificate
            EtcdConfig(**base, cert_file=str(certs.cert_path(other, "gateway")),
                       key_file=str(certs.key_path(other, "gateway"))),  # a certificate of another CA
        ]
        for cfg in refused:
            with pytest.raises(aetcd.exceptions.ClientError):
                await _roundtrip(cfg)


async def test_user_and_password(tmp_path):
    # Tokens lapse after 2 idle seconds here (300 by default) and all of them when etcd restarts.
    server = _etcd(tmp_path, "http", ["--auth-token-ttl", "2"])
    with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            auth = rpc.AuthStub(channel)
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-pw"))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
            await auth.UserAdd(rpc.AuthUserAddRequest(name="llmserve", password="s3cret"))
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name="llmserve"))
            await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="llmserve", perm=rpc.Permission(
                permType=rpc.Permission.READWRITE, key=b"/auth-test/", range_end=b"/auth-test0")))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="llmserve", role="llmserve"))
            await auth.AuthEnable(rpc.AuthEnableRequest())
        base = dict(host="127.0.0.1", port=server.port, timeout_s=3.0)
        assert await _roundtrip(EtcdConfig(**base, username="llmserve", password="s3cret")) == b"v"
        for cfg in (EtcdConfig(**base), EtcdConfig(**base, username="llmserve", password="wrong")):
            with pytest.raises(aetcd.exceptions.ClientError):
                await _roundtrip(cfg)
        # One long-lived client, as a service holds it: its token lapses and etcd restarts, and it keeps working
        # (aetcd alone authenticates once per connection and fails from then on); watches carry the token too.
        client = etcd_mod.connect(EtcdConfig(**base, username="llmserve", password="s3cret"))
        try:
            await client.put(b"/auth-test/a", b"1")
            await asyncio.sleep(3)
            assert (await client.get(b"/auth-test/a")).value == b"1"
            server.restart()
            assert (await client.get(b"/auth-test/a")).value == b"1"
            events = await client.watch(b"/auth-test/w")
            await client.put(b"/auth-test/w", b"2")
            event = await asyncio.wait_for(anext(aiter(events)), 5)
            assert event.kv.value == b"2"
        finally:
            await client.close()


def test_settings_go_together():
    for bad in (EtcdConfig(username="u"), EtcdConfig(password="p"), EtcdConfig(cert_file="c", ca_file="ca"),
                EtcdConfig(cert_file="c", key_file="k")):
        with pytest.raises(ValueError):
            bad.validate()
