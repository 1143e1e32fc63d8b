"""What every peer server shares: which stage to serve, an onnxruntime session set up like ours, the CLI.

Runs inside the peers' virtual environments, which have onnxruntime, numpy and pydantic but not the product
installed; `benchmarks.peers` puts the repository on PYTHONPATH, so the manifest model and the session options
are the product's own (`model_export.manifest`, `model_export.ort_session` need nothing more).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageFile:
    """One stage of a split pipeline: its ONNX file and its v2 tensors (`{"name", "datatype", "shape"}`)."""

    pipeline: str
    name: str
    version: str
    file: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def metadata(self, platform: str) -> dict[str, Any]:
        """The v2 model metadata object (`GET /v2/models/{name}`)."""
        return {"name": self.name, "versions": [self.version], "platform": platform,
                "inputs": self.inputs, "outputs": self.outputs}


def load_stage_file(pipeline: Path | str, stage: str) -> StageFile:
    """The stage `stage` of the pipeline directory (or its pipeline.json); raises ValueError if it is not there."""
    path = Path(pipeline)
    directory = path.parent if path.is_file() else path
    from model_export.manifest import load_manifest

    data = load_manifest(directory).model_dump()
    for s in data["stages"]:
        if s["name"] == stage:
            def tensors(key: str, s: dict[str, Any] = s) -> list[dict[str, Any]]:
                return [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])} for t in s[key]]

            return StageFile(pipeline=data["name"], name=s["name"], version=s.get("version", "v1"),
                             file=(directory / s["file"]).resolve(), inputs=tensors("inputs"),
                             outputs=tensors("outputs"))
    raise ValueError(f"{directory}: no stage {stage!r}; the pipeline has {[s['name'] for s in data['stages']]}")


def create_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with the stage service's options (intra-op `threads`, inter-op 1,
    sequential, every graph optimization)."""
    from model_export.ort_session import create_session as product_session

    return product_session(str(path), threads)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pipeline", type=Path, required=True, help="pipeline directory (with pipeline.json)")
    p.add_argument("--stage", required=True, help="stage name, e.g. reference-stage-1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="HTTP port of the v2 REST endpoint")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (ours: STAGE_THREADS)")
    return p
