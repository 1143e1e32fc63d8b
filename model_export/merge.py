"""`merge`: recompose the stages into one model with onnx.compose, and prove it against the original."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import compose

from model_export.dims import graph_inputs
from model_export.errors import ExportError
from model_export.manifest import ManifestError, load_manifest, verify_stage_file
from model_export.onnx_io import load_onnx, save_onnx
from model_export.ort_session import create_session
from model_export.proof import CHAIN_TOLERANCE, Proof, Tolerance
from model_export.verify import cases_for, resolve_source


def compose_stages(stages: list[onnx.ModelProto], cut_names: list[list[str]]) -> onnx.ModelProto:
    """One model from the stages, joined at the cut tensors (`cut_names[i]`: inputs of stage i + 1)."""
    # Constants copied into several stages share names; prefix everything but the cut tensors.
    merged = compose.add_prefix(stages[0], "s0/", rename_inputs=False, rename_outputs=False)
    for i, stage in enumerate(stages[1:], start=1):
        nxt = compose.add_prefix(stage, f"s{i}/", rename_inputs=False, rename_outputs=False)
        merged = compose.merge_models(merged, nxt, io_map=[(t, t) for t in cut_names[i - 1]])
    onnx.checker.check_model(merged)
    return merged


def merge_pipeline(directory: Path, out: Path, model_path: Path | None = None, samples: Path | None = None,
                   tolerance: Tolerance = CHAIN_TOLERANCE) -> Proof:
    """Write the recomposed model to `out` once it equals the original on the proof's inputs."""
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if out.exists():
        raise ExportError(f"{out} already exists; expected a new file")
    try:
        manifest = load_manifest(directory)
        stages = [onnx.load(str(verify_stage_file(directory, s))) for s in manifest.stages]
    except ManifestError as exc:
        raise ExportError(str(exc)) from exc
    merged = compose_stages(stages, [[t.name for t in s.inputs] for s in manifest.stages[1:]])
    original_model = load_onnx(resolve_source(directory, manifest, model_path))
    if graph_inputs(merged) != graph_inputs(original_model):
        raise ExportError(f"the merged model's inputs {graph_inputs(merged)} differ from the original's "
                          f"{graph_inputs(original_model)}")
    original = create_session(original_model.SerializeToString(), manifest.profile.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp) / out.name
        save_onnx(merged, tmp_path)
        session = create_session(str(tmp_path), manifest.profile.threads)
        names = [t.name for t in manifest.outputs]
        cases = cases_for(manifest, original_model, samples)
        proof = Proof(tolerance, cases=len(cases))
        for case in cases:
            try:
                expected_all = original.run(names, case.feeds)
            except Exception as exc:  # onnxruntime's own error types: the model does not take these inputs
                proof.skip(case.label, str(exc))
                continue
            try:
                got_all = session.run(names, case.feeds)
            except Exception as exc:
                raise ExportError(f"the merged model fails on {case.label}, which the original runs: {exc}") from exc
            for name, got, expected in zip(names, got_all, expected_all, strict=True):
                proof.observe_output(name, expected)
                proof.compare(name, expected, got, case.label)
        proof.check("the merged model differs from the original; nothing was written")
        tmp_path.replace(out)
    return proof
