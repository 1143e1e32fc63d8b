"""`merge`: recompose the stages into one model with onnx.compose, and verify it against the original."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import compose

from model_export.errors import ExportError
from model_export.manifest import ManifestError, load_manifest, verify_stage_file
from model_export.onnx_io import save_onnx
from model_export.ort_session import create_session
from model_export.verify import DEFAULT_TOLERANCE, pipeline_inputs, resolve_source


def merge_pipeline(directory: Path, out: Path, model_path: Path | None = None, samples: int = 3,
                   tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Write the recomposed model to `out` and return max |merged - original| over random batches."""
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.exists():
        raise ExportError(f"{out} already exists; expected a new file")
    try:
        manifest = load_manifest(directory)
        stages = [onnx.load(str(verify_stage_file(directory, s))) for s in manifest.stages]
    except ManifestError as exc:
        raise ExportError(str(exc)) from exc
    # Constants copied into several stages share names; prefix everything but the cut tensors.
    merged = compose.add_prefix(stages[0], "s0/", rename_inputs=False, rename_outputs=False)
    for i, stage in enumerate(stages[1:], start=1):
        nxt = compose.add_prefix(stage, f"s{i}/", rename_inputs=False, rename_outputs=False)
        merged = compose.merge_models(merged, nxt, io_map=[(t.name, t.name) for t in manifest.stages[i].inputs])
    onnx.checker.check_model(merged)

    original = create_session(str(resolve_source(directory, manifest, model_path)), manifest.profile.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp) / out.name
        save_onnx(merged, tmp_path)
        session = create_session(str(tmp_path), manifest.profile.threads)
        names = [t.name for t in manifest.outputs]
        worst = 0.0
        for seed in range(samples):
            feeds = pipeline_inputs(manifest, 2, seed)
            for a, b in zip(session.run(names, feeds), original.run(names, feeds), strict=True):
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        if worst > tolerance:
            raise ExportError(f"merged model differs from the original: max |diff| = {worst:.3g} > {tolerance:g}")
        tmp_path.replace(out)
    return worst
