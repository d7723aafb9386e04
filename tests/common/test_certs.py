"""`llmserve certs`: a CA and one certificate per role, with the names they are valid for, kept when current."""

from __future__ import annotations

import ipaddress

from cryptography import x509

from llmserve.clients.cli import main
from llmserve.common import certs


def _names(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def test_certs_command_writes_a_ca_and_certificates_with_their_names(tmp_path, capsys):
    out = tmp_path / "tls"
    assert main(["certs", "--out", str(out), "--san", "scheduler.llmserve.svc", "--san", "10.1.2.3"]) == 0
    assert "wrote ca, gateway, scheduler" in capsys.readouterr().out
    for role in certs.MESH_ROLES:
        cert = x509.load_pem_x509_certificate(certs.cert_path(out, role).read_bytes())
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == role
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca_path(out).read_bytes()))
        assert _names(certs.cert_path(out, role)) == {"localhost", role, "scheduler.llmserve.svc",
                                                      str(ipaddress.ip_address("127.0.0.1")), "::1", "10.1.2.3"}
        assert certs.key_path(out, role).stat().st_mode & 0o777 == 0o600
    before = certs.cert_path(out, "worker").read_bytes()
    assert main(["certs", "--out", str(out), "--san", "scheduler.llmserve.svc", "--san", "10.1.2.3"]) == 0
    assert "already there and current" in capsys.readouterr().out
    assert certs.cert_path(out, "worker").read_bytes() == before


def test_a_new_name_or_a_new_ca_reissues(tmp_path):
    certs.ensure(tmp_path, roles=["worker"])
    assert certs.ensure(tmp_path, roles=["worker"], names=["worker.llmserve.svc"]) == ["worker"]
    (tmp_path / "ca-key.pem").unlink()  # a lost CA key: a new CA, and certificates it signed
    assert certs.ensure(tmp_path, roles=["worker"], names=["worker.llmserve.svc"]) == ["ca", "worker"]
