"""Client authentication at the local gateway: the mesh's JWT signing key, its JSON Web Key Set, and tokens.

`mesh up` creates the key once per state directory (`auth/jwt-key.pem`, mode 0600) and the public key set
beside it (`auth/jwks.json`), which the gateway's Envoy reads as the `local_jwks` of its jwt_authn filter, as
istiod inlines a RequestAuthentication's keys. `mint` signs an ES256 token for a subject (`python -m mesh token`);
the issuer and audiences are mesh.yaml's `gateway.auth`, so the same token shape holds in front of Istio.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

KEY_FILE = "jwt-key.pem"
JWKS_FILE = "jwks.json"
ALGORITHM = "ES256"
DEFAULT_EXPIRES_IN_S = 3600


@dataclass(frozen=True)
class SigningKey:
    """Paths of the private signing key and of the public key set that verifies its tokens."""

    key: Path
    jwks: Path


def key_in(directory: Path) -> SigningKey:
    return SigningKey(directory / KEY_FILE, directory / JWKS_FILE)


def _kid(jwk: dict[str, Any]) -> str:
    """The key's RFC 7638 thumbprint: SHA-256 of its required members in lexical order, base64url."""
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def public_jwk(private: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": _kid(jwk), "alg": ALGORITHM, "use": "sig"}


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def create_signing_key(directory: Path) -> SigningKey:
    """The signing key and key set in `directory`: those already there, or new ones (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    found = key_in(directory)
    if found.key.is_file() and found.jwks.is_file():
        return found
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(found.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    found.jwks.write_text(json.dumps({"keys": [public_jwk(private)]}, indent=1))
    return found


def mint(key: SigningKey, subject: str, issuer: str, audiences: list[str],
         expires_in_s: float = DEFAULT_EXPIRES_IN_S, issued_at: float | None = None) -> str:
    """An ES256 token for `subject`, valid from `issued_at` (default: now) for `expires_in_s` seconds."""
    private = _load_private(key.key)
    now = int(time.time() if issued_at is None else issued_at)
    claims = {"iss": issuer, "sub": subject, "aud": audiences[0] if len(audiences) == 1 else audiences,
              "iat": now, "exp": now + int(expires_in_s)}
    return jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": public_jwk(private)["kid"]})
