"""A local certificate authority for the mesh's mTLS: `llmserve certs` and `security.tls: auto`.

One CA (ca.pem, its key ca-key.pem) signs one certificate per role (<role>.pem, <role>-key.pem). The role is the
certificate's common name, which internal servers check (common/tls.py); every certificate names localhost,
127.0.0.1, ::1 and its role as subject alternative names, plus any extra names given (Kubernetes Service names).
Keys are ECDSA P-256, written 0600. A certificate is good for both ends of a connection (the scheduler serves the
gateway and calls workers), so each has both the server and the client extended key usage.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import typing

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every certificate `llmserve run` needs: one per service, the REST sidecar's, and "client" for the CLI, the
# launcher's health checks and operators' admin calls.
MESH_ROLES = ("gateway", "scheduler", "worker", "registry", "rest", "client")
CA_DAYS = 3650
CERT_DAYS = 365
RENEW_BEFORE_DAYS = 30  # ensure() re-issues a certificate that expires sooner than this
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def cert_path(directory: str | os.PathLike, role: str) -> pathlib.Path:
    return pathlib.Path(directory) / f"{role}.pem"


def key_path(directory: str | os.PathLike, role: str) -> pathlib.Path:
    return pathlib.Path(directory) / f"{role}-key.pem"


def ca_path(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory) / "ca.pem"


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Atomically, with its mode from the start (a key is never readable by others, not even for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(common_name: str = "llmserve local CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, role: str,
          names: typing.Iterable[str] = ()) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for `role` (its common name), valid for the local names, the role and `names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans = list(dict.fromkeys([*LOCAL_NAMES, role, *names]))
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in sans]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _load_ca(directory: pathlib.Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    ca_key_file = directory / "ca-key.pem"
    if not (ca_path(directory).exists() and ca_key_file.exists()):
        return None
    cert = x509.load_pem_x509_certificate(ca_path(directory).read_bytes())
    key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_file}: not an ECDSA key written by `llmserve certs`")
    return key, cert


def _is_fresh(path: pathlib.Path, ca_cert: x509.Certificate, names: typing.Sequence[str]) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - _now() < datetime.timedelta(RENEW_BEFORE_DAYS):
        return False
    try:  # a certificate is valid for the CA only if the CA signed it (a re-made CA has the same name)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    present = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    return {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names} <= present


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def ensure(directory: str | os.PathLike, roles: typing.Iterable[str] = MESH_ROLES,
           names: typing.Iterable[str] = ()) -> list[str]:
    """Makes `directory` hold a CA and a current certificate for each role (valid for `names` too), keeping what
    is already there and good. Returns what it wrote ("ca", roles)."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    names = list(names)
    written = []
    loaded = _load_ca(out)
    if loaded is None or loaded[1].not_valid_after_utc - _now() < datetime.timedelta(RENEW_BEFORE_DAYS):
        loaded = make_ca()
        _write(out / "ca-key.pem", _key_pem(loaded[0]), 0o600)
        _write(ca_path(out), loaded[1].public_bytes(serialization.Encoding.PEM), 0o644)
        written.append("ca")
    ca_key, ca_cert = loaded
    for role in roles:
        if _is_fresh(cert_path(out, role), ca_cert, [role, *names]) and key_path(out, role).exists():
            continue
        key, cert = issue(ca_key, ca_cert, role, names)
        _write(key_path(out, role), _key_pem(key), 0o600)
        _write(cert_path(out, role), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written.append(role)
    return written
