"""Authenticated clients at the local gateway, on real Envoy: TLS with a certificate from the mesh's CA, a JWT
checked by Envoy's jwt_authn filter against the key set `mesh up` made, the same on the gRPC port; plain HTTP
only with `--insecure-gateway`; `mesh.yaml` turning auth off."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import gateway_auth, local
from mesh.v2client import encode, infer
from model_export.manifest import Manifest
from tests.mesh.local_mesh import mesh_cli, running_mesh, write_policy

MODEL_PATH = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def mesh(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state_dir = tmp_path_factory.mktemp("mesh-auth") / ".mesh"
    with running_mesh(tiny_pipeline[0], None, state_dir):
        yield state_dir


@pytest.fixture(scope="module")
def gateway(mesh: Path) -> local.GatewayCredentials:
    return local.gateway_credentials(mesh, subject="test-client")


def _x() -> np.ndarray:
    return np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)


def _post(gateway: local.GatewayCredentials, token: str | None) -> httpx.Response:
    body, headers = encode({"x": _x()})
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    with httpx.Client(verify=gateway.ssl_context() or True, timeout=30.0) as client:
        return client.post(f"{gateway.url}{MODEL_PATH}", content=body, headers=headers)


def _state(mesh: Path) -> local.State:
    state = local.read_state(mesh)
    assert state is not None
    return state


def test_a_good_token_gets_the_right_answer(gateway: local.GatewayCredentials,
                                           tiny_pipeline: tuple[Path, Manifest]) -> None:
    assert gateway.url.startswith("https://") and gateway.token
    with gateway.client(timeout=30.0) as client:
        outputs, _ = infer(client, gateway.url, "tiny", {"x": _x()})
    want = ort.InferenceSession(str(tiny_pipeline[0] / "model.onnx")).run(None, {"x": _x()})[0]
    np.testing.assert_allclose(outputs["y"], want, atol=1e-5, rtol=0)


def test_no_token_is_401(gateway: local.GatewayCredentials) -> None:
    response = _post(gateway, None)
    assert response.status_code == 401, response.text
    assert "Jwt is missing" in response.text


def test_an_expired_token_is_401(gateway: local.GatewayCredentials, mesh: Path) -> None:
    # Envoy allows 60 s of clock skew: this one expired 10 minutes ago.
    token = local.mint_token(_state(mesh), mesh, "late", expires_in_s=60, issued_at=time.time() - 660)
    response = _post(gateway, token)
    assert response.status_code == 401 and "Jwt is expired" in response.text, response.text


def test_a_token_signed_by_another_key_is_401(gateway: local.GatewayCredentials, mesh: Path,
                                              tmp_path: Path) -> None:
    auth = _state(mesh).policy.gateway.auth
    other = gateway_auth.create_signing_key(tmp_path / "other")
    token = gateway_auth.mint(other, "forger", auth.issuer, auth.audiences)
    response = _post(gateway, token)
    assert response.status_code == 401, response.text
    assert "Jwks doesn't have key to match kid" in response.text
    # the same forgery claiming the mesh's own key id: the signature itself is checked
    ours = json.loads(gateway_auth.key_in(mesh / local.AUTH_DIR).jwks.read_text())["keys"][0]["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, serialization.load_pem_private_key(other.key.read_bytes(), None),
                        algorithm="ES256", headers={"kid": ours})
    response = _post(gateway, forged)
    assert response.status_code == 401, response.text
    assert "Jwt verification fails" in response.text


def test_a_tampered_token_is_401(gateway: local.GatewayCredentials) -> None:
    assert gateway.token is not None
    header, payload, signature = gateway.token.split(".")
    response = _post(gateway, f"{header}.{payload}.{signature[::-1]}")
    assert response.status_code == 401, response.text


def test_another_audience_is_403_and_another_issuer_401(gateway: local.GatewayCredentials, mesh: Path) -> None:
    """As Envoy's jwt_authn answers: a token of the right issuer for another audience is forbidden (403); a token
    of an issuer the gateway does not know is not authenticated at all (401)."""
    auth = _state(mesh).policy.gateway.auth
    key = gateway_auth.key_in(mesh / local.AUTH_DIR)
    wrong_audience = _post(gateway, gateway_auth.mint(key, "s", auth.issuer, ["someone-else"]))
    assert wrong_audience.status_code == 403, wrong_audience.text
    assert "Audiences in Jwt are not allowed" in wrong_audience.text
    wrong_issuer = _post(gateway, gateway_auth.mint(key, "s", "https://elsewhere.example", auth.audiences))
    assert wrong_issuer.status_code == 401, wrong_issuer.text


def test_health_is_open_and_other_paths_stay_closed(gateway: local.GatewayCredentials) -> None:
    """Health answers without a token, as Istio's ingress probes do; paths the gateway does not forward are 404
    with a token too, and never name a stage or an internal address."""
    with httpx.Client(verify=gateway.ssl_context() or True, timeout=10.0) as anonymous:
        assert anonymous.get(f"{gateway.url}/v2/health/ready").status_code == 200
    with gateway.client(timeout=10.0) as client:
        for path in ("/metrics", "/v2/models/tiny-stage-1", "/v2"):
            response = client.get(f"{gateway.url}{path}")
            assert response.status_code == 404, (path, response.text)
            assert "tiny-stage" not in response.text and "127.0.0.1" not in response.text


def test_tls_is_verified_against_the_mesh_ca(gateway: local.GatewayCredentials, mesh: Path) -> None:
    """The gateway's certificate chains to the mesh's CA and names the address clients call; a client that trusts
    only the system's CAs refuses it; plain HTTP on the TLS port gets no HTTP answer."""
    ca = mesh / "pki" / "ca.pem"
    result = subprocess.run(["curl", "-sS", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}",
                             f"{gateway.url}/v2/health/ready"], capture_output=True, text=True, timeout=30)
    assert result.stdout == "200", result.stderr
    untrusted = subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{gateway.url}/v2/health/ready"],
                               capture_output=True, text=True, timeout=30)
    assert untrusted.returncode == 60, untrusted.stderr  # curl: peer certificate cannot be authenticated
    with httpx.Client(timeout=5.0) as plain, pytest.raises(httpx.TransportError):
        plain.get(gateway.url.replace("https://", "http://") + "/v2/health/ready")


def test_the_token_command_mints_what_the_gateway_accepts(gateway: local.GatewayCredentials, mesh: Path) -> None:
    done = mesh_cli("token", "--subject", "alice", "--expires-in", "120", "--state-dir", str(mesh))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert _post(gateway, token).status_code == 200
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120


def test_the_token_command_refuses_bad_input(mesh: Path, tmp_path: Path) -> None:
    for args, words in ((["--subject", "a", "--expires-in", "0"], "--expires-in must be more than 0 and at most"),
                        (["--subject", " "], "--subject must not be empty")):
        done = mesh_cli("token", *args, "--state-dir", str(mesh))
        assert done.returncode == 2 and words in done.stderr, done.stderr
    done = mesh_cli("token", "--subject", "a", "--state-dir", str(tmp_path / "none"))
    assert done.returncode == 2 and "no mesh is running" in done.stderr


def test_grpc_needs_the_token_too(gateway: local.GatewayCredentials, tiny_pipeline: tuple[Path, Manifest]) -> None:
    assert gateway.grpc_address is not None and gateway.ca is not None
    client = triton_grpc.InferenceServerClient(gateway.grpc_address, ssl=True,
                                               root_certificates=str(gateway.ca))
    inputs = [triton_grpc.InferInput("x", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(_x())
    with pytest.raises(triton_grpc.InferenceServerException) as refused:
        client.infer("tiny", inputs)
    assert "401" in str(refused.value) or "UNAUTHENTICATED" in str(refused.value), refused.value
    result = client.infer("tiny", inputs, headers=gateway.headers)
    want = ort.InferenceSession(str(tiny_pipeline[0] / "model.onnx")).run(None, {"x": _x()})[0]
    np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-5, rtol=0)
    client.close()


def test_plain_http_only_with_the_flag_and_auth_off_by_policy(tiny_pipeline: tuple[Path, Manifest],
                                                              tmp_path: Path) -> None:
    """`--insecure-gateway` serves plain HTTP (a token still required); `gateway.auth.enabled: false` in mesh.yaml
    takes none and `mesh token` says so."""
    policy = write_policy(tmp_path / "mesh.yaml", {"gateway": {"auth": {"enabled": False}}})
    state_dir = tmp_path / ".mesh"
    with running_mesh(tiny_pipeline[0], policy, state_dir, "--insecure-gateway") as state:
        assert state.layout.gateway_url.startswith("http://")
        body, headers = encode({"x": _x()})
        with httpx.Client(timeout=30.0) as client:
            assert client.post(f"{state.layout.gateway_url}{MODEL_PATH}", content=body,
                               headers=headers).status_code == 200
        with pytest.raises(httpx.ConnectError), httpx.Client(verify=ssl.create_default_context(), timeout=5) as tls:
            tls.get(f"https://127.0.0.1:{state.layout.gateway_port}/v2/health/ready")
        done = mesh_cli("token", "--subject", "a", "--state-dir", str(state_dir))
        assert done.returncode == 2 and "takes no token" in done.stderr


def test_insecure_gateway_still_wants_a_token(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    state_dir = tmp_path / ".mesh"
    with running_mesh(tiny_pipeline[0], None, state_dir, "--insecure-gateway") as state:
        gateway = local.gateway_credentials(state_dir, state)
        assert gateway.ca is None and gateway.url.startswith("http://")
        assert _post(gateway, None).status_code == 401
        assert _post(gateway, gateway.token).status_code == 200


def test_another_signing_key_is_a_key_set_envoy_reads(tmp_path: Path) -> None:
    """The key set's one key verifies the tokens `mint` signs, by its kid (PyJWT, not our code, checks)."""
    key = gateway_auth.create_signing_key(tmp_path)
    assert key.key.stat().st_mode & 0o777 == 0o600
    jwks = json.loads(key.jwks.read_text())
    token = gateway_auth.mint(key, "s", "https://i.example", ["a", "b"])
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    public = jwt.PyJWK(jwk).key
    assert isinstance(public, ec.EllipticCurvePublicKey)
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="b", issuer="https://i.example")
    assert claims["sub"] == "s"
    assert gateway_auth.create_signing_key(tmp_path).jwks.read_text() == key.jwks.read_text()  # kept, not replaced


def test_loadtest_through_the_gateway_with_the_ca_and_a_token(gateway: local.GatewayCredentials) -> None:
    def loadtest(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loadtest", "run", "--url", gateway.url, "--model", "tiny",
                               "--rate", "5", "--duration", "1", *more], capture_output=True, text=True, timeout=120)

    assert gateway.ca is not None and gateway.token is not None
    done = loadtest("--cacert", str(gateway.ca), "--token", gateway.token)
    assert done.returncode == 0, done.stdout + done.stderr
    refused = loadtest("--cacert", str(gateway.ca))
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr, refused.stderr
    untrusted = loadtest("--token", gateway.token)
    assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
