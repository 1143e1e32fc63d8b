"""A local certificate authority and one certificate per workload identity, as Istio's CA would issue them.

Each certificate carries exactly one URI SAN, the workload's SPIFFE id
(`spiffe://cluster.local/ns/<namespace>/sa/<service-account>`), and is valid both as a server and as a
client certificate, so one file pair serves a sidecar's inbound (server) and outbound (client) side.
The local gateway's server certificate (`issue_server`) carries the host names and addresses clients call it by
instead. Keys are EC P-256; private key files are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "meshpipe local CA"
VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertPair:
    """Paths of one PEM certificate and its private key."""

    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load(pair: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pair.key}: expected an EC private key")
    return cert, key


def create_ca(directory: Path) -> CertPair:
    """Create `ca.pem` and `ca-key.pem` in `directory`, or return the ones already there."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "ca.pem", directory / "ca-key.pem")
    if pair.cert.is_file() and pair.key.is_file():
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def issue(ca: CertPair, spiffe_id: str, directory: Path, name: str) -> CertPair:
    """Issue `<name>.pem` / `<name>-key.pem` for one workload identity, signed by `ca`."""
    if not spiffe_id.startswith("spiffe://"):
        raise ValueError(f"expected a spiffe:// id, got {spiffe_id!r}")
    return _issue(ca, [x509.UniformResourceIdentifier(spiffe_id)], directory, name)


def issue_server(ca: CertPair, hosts: list[str], directory: Path, name: str) -> CertPair:
    """Issue `<name>.pem` / `<name>-key.pem`: a server certificate for `hosts` (names and IP addresses), as a
    client checks a gateway's certificate against the host it called."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _issue(ca, sans, directory, name)


def _issue(ca: CertPair, sans: list[x509.GeneralName], directory: Path, name: str) -> CertPair:
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        # Istio's workload certificates have an empty subject; the identity is the URI SAN alone.
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def spiffe_id_of(cert_path: Path) -> str:
    """The URI SAN of a certificate (for checks and `mesh status`)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"{cert_path}: expected one URI SAN, found {uris}")
    return uris[0]
