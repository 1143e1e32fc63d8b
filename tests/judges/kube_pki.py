"""Credentials for a loopback kube-apiserver: a self-signed CA, a serving certificate for 127.0.0.1 and
localhost, a service-account signing key and a static token file (one user, `system:masters`)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.pki import CertPair, create_ca

VALIDITY = dt.timedelta(days=1)
USER = "meshpipe-test"


@dataclass(frozen=True)
class ApiServerCredentials:
    """Paths of everything the API server's flags and the kubeconfig name, and the bearer token."""

    ca: CertPair
    serving: CertPair
    service_account_key: Path
    service_account_pub: Path
    token_file: Path
    token: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _serving_cert(ca: CertPair, directory: Path) -> CertPair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pair = CertPair(directory / "apiserver.pem", directory / "apiserver-key.pem")
    _write_private(pair.key, _pem_key(key))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def create_credentials(directory: Path) -> ApiServerCredentials:
    """Write the CA, the serving pair, the service-account key pair and the token file into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_ca(directory)
    sa_key = ec.generate_private_key(ec.SECP256R1())
    sa_key_path, sa_pub_path = directory / "service-account-key.pem", directory / "service-account.pem"
    _write_private(sa_key_path, _pem_key(sa_key))
    sa_pub_path.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    token = secrets.token_hex(16)
    token_file = directory / "tokens.csv"
    # --token-auth-file: token,user,uid,"groups"
    _write_private(token_file, f'{token},{USER},{USER},"system:masters"\n'.encode())
    return ApiServerCredentials(ca=ca, serving=_serving_cert(ca, directory), service_account_key=sa_key_path,
                                service_account_pub=sa_pub_path, token_file=token_file, token=token)
