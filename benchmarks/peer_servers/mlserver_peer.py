"""MLServer serving one stage: writes `settings.json` and `model-settings.json`, then execs `mlserver start`.

    .venv-peers/mlserver/bin/python -m benchmarks.peer_servers.mlserver_peer --pipeline build/reference \\
        --stage reference-stage-1 --port 8080 [--parallel-workers 0]

The model is the custom runtime `benchmarks.peer_servers.mlserver_runtime.OnnxStage`. MLServer's REST v2 speaks JSON
tensors only (no binary tensor extension). Settings that differ from MLServer's defaults, each to match what
the stage service does: `debug` off (no per-request access log), gzip of responses off (httpx asks for gzip,
and the stage service never compresses), the separate metrics server off, and `parallel_workers` (default 1:
inference in one separate worker process, requests handed over by IPC) set by `--parallel-workers`
(0: inference in the server process, on its event loop). The gRPC server cannot be turned off; it gets a
free loopback port and no traffic. The process that runs is MLServer's own (exec), so its PID is the server's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from benchmarks.peer_servers.common import load_stage_file, parser


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, args: object) -> Path:
    """settings.json (server) and <stage>/model-settings.json (model) under `directory`."""
    a = vars(args)
    stage = load_stage_file(a["pipeline"], a["stage"])
    server = {
        "host": a["host"], "http_port": a["port"], "grpc_port": a["grpc_port"] or _free_port(a["host"]),
        "debug": False, "gzip_enabled": False, "metrics_endpoint": None, "metrics_dir": str(directory / "metrics"),
        "parallel_workers": a["parallel_workers"], "load_models_at_startup": True,
    }
    model = {
        "name": stage.name, "implementation": "benchmarks.peer_servers.mlserver_runtime.OnnxStage",
        "platform": "onnxruntime", "versions": [stage.version],
        "inputs": stage.inputs, "outputs": stage.outputs,
        "parameters": {"uri": str(stage.file), "version": stage.version, "extra": {"threads": a["threads"]}},
    }
    (directory / "settings.json").write_text(json.dumps(server, indent=2))
    (directory / stage.name).mkdir(parents=True, exist_ok=True)
    (directory / stage.name / "model-settings.json").write_text(json.dumps(model, indent=2))
    return directory


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ or "")
    p.add_argument("--parallel-workers", type=int, default=0, help="MLServer parallel_workers (its default: 1)")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC port (default: a free one)")
    p.add_argument("--workdir", type=Path, help="where the settings files go (default: a new temp dir)")
    args = p.parse_args(argv)
    directory = (args.workdir or Path(tempfile.mkdtemp(prefix="mlserver-peer-"))).resolve()
    directory.mkdir(parents=True, exist_ok=True)  # absolute: `mlserver start` runs from inside it
    write_config(directory, args)
    repo = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    mlserver = shutil.which("mlserver", path=str(Path(sys.executable).parent)) or "mlserver"
    os.chdir(directory)
    os.execv(mlserver, [mlserver, "start", str(directory)])


if __name__ == "__main__":
    main()
