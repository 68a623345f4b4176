"""Throwaway test PKI for the mock servers: a CA, a loopback server certificate and APNs-style client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "bemsmail test CA (throwaway)"
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
# Apple puts the app's bundle id in the subject UID of a push certificate; aioapns reads the topic from there.
_UID = NameOID.USER_ID


@dataclass(frozen=True, slots=True)
class TestPki:
    """Where the files of one throwaway PKI live; every key file is mode 0600."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def server_context(self, alpn: Sequence[str] = ("h2",), client_auth: bool = True) -> ssl.SSLContext:
        """A server-side context with ALPN; with `client_auth`, a client certificate is optional but, if sent,
        must be signed by this CA (as APNs verifies provider certificates)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if client_auth:
            ctx.load_verify_locations(cafile=str(self.ca_cert))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if secret:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_ca(pki: TestPki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki.ca_key} is not an EC key")
    return cert, key


def _still_valid(pki: TestPki) -> bool:
    try:
        for path in (pki.ca_cert, pki.server_cert):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if cert.not_valid_after_utc < _now() + dt.timedelta(days=1):
                return False
        _load_ca(pki)
        serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    return True


def ensure_test_pki(directory: Path, *, days: int = 30) -> TestPki:
    """Create (or reuse, if present and valid for another day) a CA and a server certificate for localhost,
    127.0.0.1 and ::1 in `directory`. P-256 keys: generated in milliseconds, so every test can have its own."""
    directory = Path(directory)
    pki = TestPki(
        directory,
        directory / "ca.pem",
        directory / "ca-key.pem",
        directory / "server.pem",
        directory / "server-key.pem",
    )
    if _still_valid(pki):
        return pki
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(pki.ca_key, _key_pem(ca_key), secret=True)
    _write(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(pki.server_key, _key_pem(server_key), secret=True)
    _write(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return pki


def issue_client_certificate(
    pki: TestPki,
    topic: str,
    out: Path,
    *,
    not_after: dt.datetime | None = None,
    issuer: TestPki | None = None,
) -> Path:
    """Write `out`: one PEM holding an APNs-style provider certificate for `topic` (subject UID = topic, as
    Apple issues them) and its key, signed by `issuer` (default: `pki`'s CA). Returns `out`."""
    ca_cert, ca_key = _load_ca(issuer or pki)
    now = _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(_UID, topic),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(Path(out), cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key), secret=True)
    return Path(out)


def generate_provider_key(out: Path) -> Path:
    """Write an APNs-style provider signing key (.p8: PKCS#8 PEM, P-256) to `out`; returns `out`."""
    _write(Path(out), _key_pem(ec.generate_private_key(ec.SECP256R1())), secret=True)
    return Path(out)
