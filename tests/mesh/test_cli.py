"""`python -m mesh` as a user meets it: help on every option, the running mesh found from any directory
(and its logs after `down`), `apply` re-reading the policy `up` used, `--json` beside every table, and
tables that fit 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from mesh import cli_trace, local, state_dir
from mesh.__main__ import build_parser, main
from model_export.manifest import Manifest
from tests.mesh.local_mesh import mesh_cli, processes_of, write_policy
from tests.mesh.test_trace import T1_ID, span, write_state
from tests.model_export.test_cli import options_without_help_or_default
from tests.tiny import write_tiny_pipeline


def test_every_option_has_help_and_shows_its_default() -> None:
    assert options_without_help_or_default(build_parser()) == []


def test_state_dir_found_upwards_then_from_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "build" / "deep").mkdir(parents=True)
    elsewhere.mkdir()
    assert state_dir.for_up(None, cwd=project / "build") == project / "build" / ".mesh"  # none yet: here
    (project / ".mesh").mkdir()
    assert state_dir.for_up(None, cwd=project / "build" / "deep") == project / ".mesh"  # the project's
    assert state_dir.for_up(tmp_path / "x", cwd=project) == tmp_path / "x"
    # nothing recorded, nothing running: ./.mesh, and the message says where it looked
    assert state_dir.find(None, cwd=elsewhere) == elsewhere / ".mesh"
    assert str(state_dir.record_file()) in state_dir.searched(cwd=elsewhere)
    (project / ".mesh" / local.STATE_FILE).write_text("{}")
    state_dir.record(project / ".mesh")
    assert state_dir.find(None, cwd=project / "build" / "deep") == project / ".mesh"
    assert state_dir.find(None, cwd=elsewhere) == project / ".mesh"  # from the record
    # a running mesh wins over a stopped one nearer by
    (elsewhere / ".mesh").mkdir()
    (elsewhere / ".mesh" / local.LAST_STATE_FILE).write_text("{}")
    assert state_dir.find(None, cwd=elsewhere) == project / ".mesh"
    (project / ".mesh" / local.STATE_FILE).unlink()
    assert state_dir.find(None, cwd=elsewhere) == elsewhere / ".mesh"
    # two meshes up: the newer is found from anywhere; once it is down, the older still running, not the record
    # of a stopped one (the record keeps both, newest first)
    (project / ".mesh" / local.STATE_FILE).write_text("{}")
    other = tmp_path / "other" / ".mesh"
    other.mkdir(parents=True)
    (other / local.STATE_FILE).write_text("{}")
    state_dir.record(other)
    assert state_dir.recorded() == [other, project / ".mesh"]
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    assert state_dir.find(None, cwd=nowhere) == other
    (other / local.STATE_FILE).rename(other / local.LAST_STATE_FILE)  # what `down` does
    assert state_dir.find(None, cwd=nowhere) == project / ".mesh"


def test_the_running_mesh_is_found_from_any_directory(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    write_policy(project / "mesh.yaml", {"defaults": {"retries": {"attempts": 1}}})
    up = mesh_cli("up", "--pipeline", str(tiny_pipeline[0]), "--policy", "mesh.yaml", "--detach",
                  "--gateway-port", "0", "--json", cwd=project)
    assert up.returncode == 0, up.stderr
    where = project / ".mesh"
    assert json.loads(up.stdout)["state_dir"] == str(where.resolve())
    try:
        status = mesh_cli("status", cwd=elsewhere, columns=80)
        assert status.returncode == 0, status.stderr
        table = [line for line in status.stdout.splitlines() if str(where) not in line]  # a path is as long as it is
        processes = table[:table.index(next(x for x in table if x.startswith("discovery records")))]
        assert len(processes) == 10 and all(len(line) <= 80 for line in table), status.stdout  # 8 + keeper
        names = [p["name"] for p in json.loads(mesh_cli("status", "--json", cwd=elsewhere).stdout)["processes"]]
        assert "tiny-stage-1-v1-0" in names and "gateway" in names
        applied = mesh_cli("apply", cwd=elsewhere)  # no --policy: the file `up` used, not the defaults
        assert applied.returncode == 0, applied.stderr
        assert "(as `up` used it)" in applied.stdout and "1 retries" in applied.stdout
        state = local.read_state(where)
        assert state is not None and {h.route.attempts for h in state.policy.hops} == {1}
        logs = mesh_cli("logs", "tiny-stage-1-v1-0", "-n", "5", cwd=elsewhere)  # a name `status` shows
        assert logs.returncode == 0, logs.stderr
        assert "tiny-stage-1-v1-0.log" in logs.stdout and "tiny-stage-1-v1-0-sidecar.log" in logs.stdout
        started = json.loads(up.stdout)
        token = mesh_cli("token", "--subject", "cli", cwd=elsewhere)  # the running mesh's, found from anywhere
        assert token.returncode == 0, token.stderr
        demo = mesh_cli("demo-request", "--url", started["gateway_url"], "--cacert", started["gateway_ca"],
                        "--pipeline", str(tiny_pipeline[0]), "--token", token.stdout.strip(), "--json", cwd=elsewhere)
        assert demo.returncode == 0, demo.stderr
        answer = json.loads(demo.stdout)
        assert answer["status"] == 200 and [s["stage"] for s in answer["stages"]] == [
            "tiny-stage-0", "tiny-stage-1", "tiny-stage-2"]
        other = tmp_path / "other"
        write_tiny_pipeline(other, name="other")
        wrong = mesh_cli("demo-request", "--pipeline", str(other), cwd=elsewhere)  # not what the mesh serves
        assert wrong.returncode == 2 and f"--pipeline {other} holds pipeline 'other', but the running mesh " \
            "serves 'tiny'" in wrong.stderr, wrong.stderr
    finally:
        down = mesh_cli("down", cwd=elsewhere)
    assert down.returncode == 0 and "stopped 8 processes" in down.stdout, down.stdout + down.stderr
    assert processes_of(where) == []
    after = mesh_cli("logs", "gateway", cwd=elsewhere)  # the last mesh's logs, after `down`
    assert after.returncode == 0 and "POST /v2/models/tiny/infer" in after.stdout, after.stderr
    status = mesh_cli("status", cwd=elsewhere)
    assert status.returncode == 2 and "no mesh is running" in status.stderr


def test_trace_fits_80_columns_and_has_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    write_state(tmp_path / "state")
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    monkeypatch.setattr(cli_trace, "console", console)
    assert main(["trace", "--last", "--state-dir", str(tmp_path / "state")]) == 0
    waterfall = console.export_text()
    assert "decode" in waterfall and "100.000" in waterfall and "75.0%" in waterfall
    assert main(["trace", "--list", "--state-dir", str(tmp_path / "state")]) == 0
    listed = console.export_text()
    assert "rid-1" in listed and "100.000" in listed
    assert all(len(line) <= 80 for line in (waterfall + listed).splitlines()), waterfall + listed
    capsys.readouterr()
    assert main(["trace", "rid-1", "--json", "--state-dir", str(tmp_path / "state")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["request_id"] == "rid-1" and [s["depth"] for s in data["spans"]] == [0, 1, 1, 2, 3]
    assert main(["trace", "--list", "--json", "--state-dir", str(tmp_path / "state")]) == 0
    assert [t["request_id"] for t in json.loads(capsys.readouterr().out)] == ["rid-1", "rid-0"]


def write_chain_trace(state: Path, stages: int = 4) -> None:
    """A request through `stages` stages named as the reference pipeline's, nested as the real ones are."""
    spans, parent = [], None
    for i in range(stages):
        service = f"reference-stage-{i}"
        server, forward = f"{i:015x}a", f"{i:015x}f"
        attrs = {"meshpipe.pipeline": "reference", "meshpipe.stage.version": "v1", "http.response.status_code": 200,
                 "meshpipe.request_id": "6843a338-1caa-477f-8978-7c3908232ad8"}
        spans.append(span(T1_ID, server, parent, "POST /v2/models/{name}/infer", "SERVER", service, i, 100 - i,
                          attrs=attrs))
        spans.append(span(T1_ID, f"{i:015x}d", server, "decode", "INTERNAL", service, i + 0.1, i + 0.2))
        spans.append(span(T1_ID, f"{i:015x}i", server, "inference", "INTERNAL", service, i + 0.2, i + 0.9))
        if i < stages - 1:
            spans.append(span(T1_ID, forward, server, "forward", "CLIENT", service, i + 1, 99 - i,
                              attrs={"http.response.status_code": 200}))
        parent = forward
    (state / "traces").mkdir(parents=True)
    (state / "traces" / "all.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))


def test_a_four_stage_waterfall_fits_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_chain_trace(tmp_path / "state")
    for width in (80, 160):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        monkeypatch.setattr(cli_trace, "console", console)
        assert main(["trace", "--last", "--state-dir", str(tmp_path / "state")]) == 0
        text = console.export_text()
        rows = [line for line in text.splitlines() if "│" in line]
        assert len(rows) == 15 and all(len(line) <= width for line in text.splitlines()[1:]), text
        # every row keeps its ms, share and a timeline of at least 10 characters
        assert all(len(row.split("│")) == 5 and len(row.split("│")[4].strip(" ")) >= 1 for row in rows), text
        if width == 80:
            assert "stage-3/v1" in text and "reference-stage-3/v1" not in text  # compact labels
        else:
            assert "reference-stage-3/v1" in text and "POST /v2/models/{name}/infer 200" in text


def test_a_start_up_failure_shows_why_envoy_aborted(tmp_path: Path) -> None:
    """Envoy logs its reason first and a long backtrace after it; the error `up` prints keeps the reason."""
    from mesh.procs import tail

    log = tmp_path / "sidecar.log"
    reason = ("[critical][assert] [source/common/filesystem/inotify/watcher_impl.cc:25] assert failure: "
              "inotify_fd_ >= 0. Details: Consider increasing value of fs.inotify.max_user_instances")
    log.write_text("\n".join([reason, *(f"[error][envoy_bug] #{i} UNKNOWN" for i in range(40))]) + "\n")
    shown = tail(log, 5, critical_first=True).splitlines()
    assert shown[0] == reason and shown[-1].endswith("#39 UNKNOWN") and len(shown) == 7
    assert reason not in tail(log, 5)  # `mesh logs -n 5` stays the last five lines


@pytest.mark.parametrize(("args", "message"), [
    (["status", "--watch", "--interval", "0"], "--interval must be between 0.1 and 3600 seconds, got 0"),
    (["logs", "gateway", "-n", "-1"], "--lines must be 0 (the whole log) or more, got -1"),
    (["token", "--subject", "a", "--expires-in", "99999999"], "got 99999999"),
])
def test_out_of_range_options_are_refused_by_name(args: list[str], message: str, tmp_path: Path) -> None:
    result = mesh_cli(*args, "--state-dir", str(tmp_path / ".mesh"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
