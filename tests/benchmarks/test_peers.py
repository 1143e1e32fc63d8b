"""The peers bench's pure helpers, in the product's venv (no peer installed): the one-stage manifest ours
serves, the peers' stage loading and session settings, MLServer's config files, RSS, verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.peer_servers.common import create_session, load_stage_file
from benchmarks.peer_servers.mlserver_peer import write_config
from benchmarks.peers import _in_turns, compare, main, markdown, rss_bytes, standalone_manifest
from loadtest.runner import Sample
from model_export.manifest import Manifest, load_manifest
from stage_service.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, decode_response, encode_request
from tests.stage_service.procs import start_stage


def test_standalone_manifest_serves_a_middle_stage_alone(tiny_pipeline: tuple[Path, Manifest],
                                                        tmp_path: Path) -> None:
    directory, manifest = tiny_pipeline
    middle = manifest.stages[1]
    one = load_manifest(standalone_manifest(directory, middle.name, tmp_path / "one"))
    assert [s.name for s in one.stages] == [middle.name]
    assert one.inputs == middle.inputs and one.outputs == middle.outputs and one.stages[0].sha256 == middle.sha256

    session = create_session(directory / middle.file)
    x = np.random.default_rng(0).random([2, *middle.inputs[0].shape[1:]]).astype(np.float32)
    want = session.run(None, {middle.inputs[0].name: x})[0]
    stage = start_stage(tmp_path / "one", middle.name, log_dir=tmp_path)
    try:
        body, length = encode_request({middle.inputs[0].name: x})
        r = httpx.post(f"{stage.url}/v2/models/{middle.name}/infer", content=body,
                       headers={"content-type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(length)})
        assert r.status_code == 200, r.text
        _, outputs = decode_response(r.content, r.headers.get(HEADER_LENGTH))
        np.testing.assert_allclose(outputs[middle.outputs[0].name], want, rtol=1e-6)
    finally:
        assert stage.stop() == 0


def test_peer_stage_file_from_the_manifest(tiny_pipeline: tuple[Path, Manifest]) -> None:
    directory, manifest = tiny_pipeline
    stage = load_stage_file(directory, manifest.stages[2].name)
    assert stage.file == (directory / manifest.stages[2].file).resolve()
    meta = stage.metadata("onnxruntime")
    # v2 metadata: name, datatype and shape (the manifest's dim_names are not part of the protocol)
    assert meta["inputs"] == [{"name": t.name, "datatype": t.datatype, "shape": t.shape}
                              for t in manifest.stages[2].inputs]
    assert load_stage_file(directory / "pipeline.json", manifest.stages[2].name) == stage
    with pytest.raises(ValueError, match="no stage 'nope'"):
        load_stage_file(directory, "nope")


def test_peer_session_has_the_stage_service_options(tiny_pipeline: tuple[Path, Manifest]) -> None:
    directory, manifest = tiny_pipeline
    options = create_session(directory / manifest.stages[0].file, threads=1).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert str(options.execution_mode).endswith("ORT_SEQUENTIAL")
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")


def test_mlserver_config_files(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, manifest = tiny_pipeline
    name = manifest.stages[1].name
    args = type("Args", (), {})()
    vars(args).update(pipeline=directory, stage=name, host="127.0.0.1", port=18080, grpc_port=18081, threads=1,
                      parallel_workers=0)
    write_config(tmp_path, args)
    server = json.loads((tmp_path / "settings.json").read_text())
    assert server["http_port"] == 18080 and server["parallel_workers"] == 0
    assert server["gzip_enabled"] is False and server["metrics_endpoint"] is None and server["debug"] is False
    model = json.loads((tmp_path / name / "model-settings.json").read_text())
    assert model["implementation"] == "benchmarks.peer_servers.mlserver_runtime.OnnxStage"
    assert Path(model["parameters"]["uri"]) == (directory / manifest.stages[1].file).resolve()
    assert model["inputs"][0]["name"] == manifest.stages[1].inputs[0].name


def test_rss_of_a_process_and_of_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert rss_bytes(os.getpid()) > 10 * 2**20
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) == 0


def _row(server: str, encoding: str, p50: float, tputs: list[float]) -> dict[str, Any]:
    runs = [{"concurrency": c, "throughput_rps": t, "latency_ms": {"p50": p50, "p99": 2 * p50}, "ok": 10,
             "requests": 10} for c, t in zip([1, 4], tputs, strict=True)]
    return {"server": server, "title": server, "version": "1", "encoding": encoding, "runs": runs,
            "latency": runs[0], "peak_rss_bytes": 100 * 2**20, "processes": 1}


def test_compare_is_like_for_like_and_markdown_lists_every_row() -> None:
    results = [_row("ours", "binary", 10, [90, 100]), _row("ours", "json", 50, [18, 20]),
               _row("kserve", "binary", 20, [40, 45]), _row("mlserver", "json", 40, [20, 25]),
               {"server": "ray", "title": "ray", "version": "1", "encoding": "json", "error": "not ready"}]
    verdicts = {(v["peer"], v["encoding"]): v for v in compare(results)}
    assert set(verdicts) == {("kserve", "binary"), ("mlserver", "json")}
    assert verdicts["kserve", "binary"]["ours_ahead"]
    assert verdicts["kserve", "binary"]["peer_p50_over_ours"] == pytest.approx(2.0)
    mls = verdicts["mlserver", "json"]  # ours is faster at c=1 but MLServer's peak throughput is higher
    assert not mls["ours_ahead"] and mls["ours_throughput_over_peer"] == pytest.approx(20 / 25)
    table = markdown(results, [1, 4])
    assert table.count("\n") == 2 + len(results)
    assert "| ray | 1 | json | failed: not ready |" in table and "100.0 (c=4)" in table


def test_ours_is_compared_with_the_run_measured_beside_each_peer() -> None:
    beside_kserve, beside_ray = _row("ours", "binary", 10, [90, 100]), _row("ours", "binary", 20, [45, 50])
    kserve, ray = _row("kserve", "binary", 30, [40, 45]), _row("ray", "binary", 30, [40, 45])
    for row, pair in ((beside_kserve, "kserve"), (kserve, "kserve"), (beside_ray, "ray"), (ray, "ray")):
        row["pair"] = pair
    verdicts = {v["peer"]: v for v in compare([beside_kserve, kserve, beside_ray, ray])}
    assert verdicts["kserve"]["peer_p50_over_ours"] == pytest.approx(3.0)
    assert verdicts["ray"]["peer_p50_over_ours"] == pytest.approx(1.5)
    assert markdown([beside_ray, ray], [1, 4]).splitlines()[2].endswith("| Ray Serve |")


def test_servers_take_turns_at_each_level_the_other_first_every_other_round() -> None:
    calls: list[tuple[str, int, float]] = []

    def load(key: str, overrun: float):  # noqa: ANN202
        def window(c: int, seconds: float) -> list[Sample]:
            calls.append((key, c, seconds))
            return [Sample(intended_s=seconds - 0.1, latency_s=overrun, status="200", max_abs_diff=None)]
        return window

    turns = _in_turns({"ours": load("ours", 0.05), "kserve": load("kserve", 0.6)}, 4, 6.0, rounds=3)
    assert calls == [("ours", 4, 2.0), ("kserve", 4, 2.0), ("kserve", 4, 2.0), ("ours", 4, 2.0),
                     ("ours", 4, 2.0), ("kserve", 4, 2.0)]
    assert {key: len(samples) for key, (samples, _) in turns.items()} == {"ours": 3, "kserve": 3}
    # a window lasts until its last request ends: ours ended within each, the peer's last ran 0.5 s over
    assert turns["ours"][1] == pytest.approx(6.0) and turns["kserve"][1] == pytest.approx(7.5)


def test_the_driver_measures_ours_alone_where_no_peer_is_asked_for(tiny_pipeline: tuple[Path, Manifest],
                                                                  tmp_path: Path) -> None:
    directory, manifest = tiny_pipeline
    bench = tmp_path / "BENCHMARKS.md"
    code = main(["--pipeline", str(directory), "--stage", manifest.stages[1].name, "--out", str(tmp_path / "out"),
                 "--benchmarks", str(bench), "--servers", "ours", "--encodings", "binary,json", "--levels", "1,2",
                 "--latency-duration", "1", "--sweep-duration", "0.5", "--warmup", "0.3", "--rounds", "2"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "peers.json").read_text())
    rows = report["results"]
    assert [(r["server"], r["encoding"], r["pair"]) for r in rows] == [("ours", "binary", None), ("ours", "json", None)]
    assert all(r["latency"]["ok"] > 0 and r["runs"][1]["concurrency"] == 2 for r in rows)
    assert report["turns"] == 2 and report["target"] == []
    assert (tmp_path / "out" / "peers.png").stat().st_size > 0 and "<!-- bench-peers:start -->" in bench.read_text()
