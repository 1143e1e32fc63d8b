"""Settings and start-up checks: every invalid setting is refused, naming it; canary files must fit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from model_export.manifest import Manifest
from stage_service.errors import StartupError
from stage_service.protocol import decode_response, encode_request
from stage_service.runtime import load_stage
from stage_service.settings import StageSettings, describe_validation_error
from tests.stage_service.procs import free_port, stage_command, stage_env, start_stage
from tests.tiny import dense_stage_graph


def settings_from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> StageSettings:
    for key in list(os.environ):
        if key.startswith("STAGE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return StageSettings()  # type: ignore[call-arg]


def base_env(directory: Path, name: str = "tiny-stage-2") -> dict[str, str]:
    return {"STAGE_MANIFEST": str(directory / "pipeline.json"), "STAGE_NAME": name}


def test_settings_read_from_env(monkeypatch: pytest.MonkeyPatch, tiny_pipeline: tuple[Path, Manifest]) -> None:
    s = settings_from_env(monkeypatch, **base_env(tiny_pipeline[0], "tiny-stage-1"),
                          STAGE_NEXT_URL="http://tiny-stage-2:8080/", STAGE_PROVIDERS="cpu", STAGE_THREADS="2",
                          STAGE_TIMEOUT_S="2.5", STAGE_MAX_INFLIGHT="7", STAGE_VERSION="v2")
    assert s.next_url == "http://tiny-stage-2:8080"
    assert s.providers == ["CPUExecutionProvider"]
    assert (s.threads, s.timeout_s, s.max_inflight, s.version) == (2, 2.5, 7, "v2")


@pytest.mark.parametrize(("env", "setting"), [
    ({"STAGE_PORT": "70000"}, "STAGE_PORT"),
    ({"STAGE_PORT": "http"}, "STAGE_PORT"),
    ({"STAGE_THREADS": "0"}, "STAGE_THREADS"),
    ({"STAGE_TIMEOUT_S": "-1"}, "STAGE_TIMEOUT_S"),
    ({"STAGE_MAX_REQUEST_BYTES": "10"}, "STAGE_MAX_REQUEST_BYTES"),
    ({"STAGE_MAX_INFLIGHT": "0"}, "STAGE_MAX_INFLIGHT"),
    ({"STAGE_MAX_BUFFERED_BYTES": "4096"}, "STAGE_MAX_BUFFERED_BYTES"),  # below STAGE_MAX_REQUEST_BYTES
    ({"STAGE_MAX_HEADER_BYTES": "10"}, "STAGE_MAX_HEADER_BYTES"),
    ({"STAGE_BODY_TIMEOUT_S": "0"}, "STAGE_BODY_TIMEOUT_S"),
    ({"STAGE_NEXT_URL": "ftp://elsewhere"}, "STAGE_NEXT_URL"),
    ({"STAGE_VERSION": "V_2"}, "STAGE_VERSION"),
    ({"STAGE_PROVIDERS": " , "}, "STAGE_PROVIDERS"),
    ({"STAGE_MANIFEST": ""}, "STAGE_NAME"),  # STAGE_NAME unset: reported as missing
    ({"STAGE_UDS": "stage.sock"}, "STAGE_UDS"),  # relative
    ({"STAGE_UDS": "/" + "s" * 120}, "STAGE_UDS"),  # longer than a socket's path may be
    ({"STAGE_GRPC_UDS": "/run/g.sock", "STAGE_GRPC_PORT": "9000"}, "STAGE_GRPC_UDS"),
    ({"STAGE_NEXT_UDS": "/run/out.sock"}, "STAGE_NEXT_UDS"),  # and no STAGE_NEXT_URL
])
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, tiny_pipeline: tuple[Path, Manifest],
                                  env: dict[str, str], setting: str) -> None:
    full = {**base_env(tiny_pipeline[0]), **env}
    if setting == "STAGE_NAME":
        full = {"STAGE_MANIFEST": str(tiny_pipeline[0])}
    with pytest.raises(ValidationError) as info:
        settings_from_env(monkeypatch, **full)
    assert describe_validation_error(info.value).count(setting) >= 1


@pytest.mark.parametrize(("env", "setting", "words"), [
    ({"STAGE_NAME": "tiny-stage-9"}, "STAGE_NAME", "tiny-stage-9"),
    ({"STAGE_NAME": "tiny-stage-1"}, "STAGE_NEXT_URL", "tiny-stage-2"),
    ({"STAGE_NEXT_URL": "http://127.0.0.1:1"}, "STAGE_NEXT_URL", "last stage"),
    ({"STAGE_PROVIDERS": "NopeExecutionProvider"}, "STAGE_PROVIDERS", "available"),
    ({"STAGE_MANIFEST": "/nonexistent/pipeline.json"}, "STAGE_MANIFEST", "no manifest"),
    ({"STAGE_FILE": "/nonexistent/stage.onnx"}, "STAGE_FILE", "not a file"),
])
def test_startup_check_names_the_setting(monkeypatch: pytest.MonkeyPatch, tiny_pipeline: tuple[Path, Manifest],
                                         env: dict[str, str], setting: str, words: str) -> None:
    settings = settings_from_env(monkeypatch, **{**base_env(tiny_pipeline[0]), **env})
    with pytest.raises(StartupError) as info:
        load_stage(settings)
    assert str(info.value).startswith(setting + ":")
    assert words in str(info.value)


def run_to_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(stage_command(), env=env, capture_output=True, text=True, timeout=60)


def test_sha256_mismatch_refuses_to_start(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory = tmp_path / "tampered"
    shutil.copytree(tiny_pipeline[0], directory)
    onnx.save(dense_stage_graph(2, "h2", "y", 24, 4, seed=99), directory / "stage-2.onnx")  # same shape, new weights
    done = run_to_exit(stage_env(directory / "pipeline.json", "tiny-stage-2", free_port()))
    assert done.returncode != 0
    assert "sha256" in done.stderr and "tiny-stage-2" in done.stderr and "refusing to start" in done.stderr


def test_invalid_setting_exits_nonzero_naming_it(tiny_pipeline: tuple[Path, Manifest]) -> None:
    env = stage_env(tiny_pipeline[0] / "pipeline.json", "tiny-stage-2", free_port(), extra={"STAGE_THREADS": "many"})
    done = run_to_exit(env)
    assert done.returncode != 0
    assert "STAGE_THREADS" in done.stderr


def test_a_taken_port_is_refused_before_the_model_loads(tiny_pipeline: tuple[Path, Manifest]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_to_exit(stage_env(tiny_pipeline[0] / "pipeline.json", "tiny-stage-2", port))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"stage_service: cannot start: STAGE_PORT {port} on 127.0.0.1: Address already "
                                   "in use")
    assert "startup complete" not in done.stdout + done.stderr  # refused before loading anything


def test_a_misspelt_setting_is_refused_with_the_nearest_name(tiny_pipeline: tuple[Path, Manifest]) -> None:
    """A STAGE_* variable that is no setting would otherwise be ignored in silence, its default used."""
    env = stage_env(tiny_pipeline[0] / "pipeline.json", "tiny-stage-2", free_port(),
                    extra={"STAGE_MAX_BATCHSIZE": "8", "STAGE_COLOUR": "blue"})
    done = run_to_exit(env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("stage_service: STAGE_COLOUR: not a setting; `python -m stage_service --help` "
                                   "lists them; STAGE_MAX_BATCHSIZE: not a setting; did you mean "
                                   "STAGE_MAX_BATCH_SIZE?")


@pytest.mark.parametrize(("graph", "words"), [
    (dense_stage_graph(2, "h2", "y", 25, 4, seed=5), "input h2 has shape"),
    (dense_stage_graph(2, "h2", "y", 24, 5, seed=5), "output y has shape"),
    (dense_stage_graph(2, "hidden", "y", 24, 4, seed=5), "inputs are ['hidden']"),
])
def test_canary_file_must_fit_the_stage(monkeypatch: pytest.MonkeyPatch, tiny_pipeline: tuple[Path, Manifest],
                                        tmp_path: Path, graph: onnx.ModelProto, words: str) -> None:
    onnx.save(graph, tmp_path / "canary.onnx")
    settings = settings_from_env(monkeypatch, **base_env(tiny_pipeline[0]), STAGE_FILE=str(tmp_path / "canary.onnx"))
    with pytest.raises(StartupError) as info:
        load_stage(settings)
    assert str(info.value).startswith("STAGE_FILE:")
    assert words in str(info.value)


def test_canary_file_serves_with_its_version(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    canary = tmp_path / "canary.onnx"
    onnx.save(dense_stage_graph(2, "h2", "y", 24, 4, seed=123), canary)
    h2 = np.random.default_rng(0).random((3, 24)).astype(np.float32)
    expected = ort.InferenceSession(str(canary)).run(None, {"h2": h2})[0]
    body, length = encode_request({"h2": h2})
    stage = start_stage(tiny_pipeline[0] / "pipeline.json", "tiny-stage-2", log_dir=tmp_path,
                        env={"STAGE_FILE": str(canary), "STAGE_VERSION": "v2"})
    try:
        assert httpx.get(f"{stage.url}/v2/models/tiny-stage-2").json()["versions"] == ["v2"]
        r = httpx.post(f"{stage.url}/v2/models/tiny-stage-2/infer", content=body,
                       headers={"Inference-Header-Content-Length": str(length)})
    finally:
        assert stage.stop() == 0
    assert r.status_code == 200, r.text
    assert r.headers["x-stage-timing"].startswith("tiny-stage-2/v2=")
    response, outputs = decode_response(r.content, r.headers["Inference-Header-Content-Length"])
    assert response.model_version == "v2"
    np.testing.assert_allclose(outputs["y"], expected, atol=1e-6, rtol=0)


def test_help_prints_every_setting_with_its_default() -> None:
    done = subprocess.run([*stage_command(), "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    for name, field in StageSettings.model_fields.items():
        assert f"STAGE_{name.upper()}" in done.stdout
        assert field.description, f"STAGE_{name.upper()} has no description"
    assert "67108864" in done.stdout and "(required)" in done.stdout
    done = subprocess.run([*stage_command(), "--port", "80"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "STAGE_* environment variables" in done.stderr
