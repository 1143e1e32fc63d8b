"""The equivalence proof: the chained stages compute what the whole model computes, on every cut tensor
as well as the outputs, on realistic inputs (see `samples.proof_cases`) or the user's own, by the rule
of `proof`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from model_export.dims import BATCH_DIM, InputSpec
from model_export.errors import ExportError
from model_export.manifest import (
    DATATYPE_TO_NUMPY,
    Manifest,
    ManifestError,
    TensorSpec,
    load_manifest,
    sha256_file,
    verify_stage_file,
)
from model_export.onnx_io import load_onnx
from model_export.ort_session import create_session
from model_export.profile import with_outputs
from model_export.proof import CHAIN_TOLERANCE, Proof, Tolerance
from model_export.samples import Case, load_samples, proof_cases, random_tensors, vocabularies

Track = Callable[[Iterable[Any], str], Iterable[Any]]


def pipeline_inputs(manifest: Manifest, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for the pipeline as its manifest describes them."""
    return random_tensors(manifest.inputs, batch, seed)


def input_spec(t: TensorSpec) -> InputSpec:
    """A manifest tensor as a graph input: its dynamic dims by name (unnamed: `batch` at axis 0)."""
    names = t.dim_names or [None] * len(t.shape)
    dims: list[int | str] = []
    for axis, (size, name) in enumerate(zip(t.shape, names, strict=True)):
        if size >= 0:
            dims.append(size)
        else:
            dims.append(name or (BATCH_DIM if axis == 0 else f"{t.name}_dim{axis}"))
    return InputSpec(t.name, dims, np.dtype(DATATYPE_TO_NUMPY[t.datatype]))


def cases_for(manifest: Manifest, whole: onnx.ModelProto, samples: Path | None) -> list[Case]:
    specs = [input_spec(t) for t in manifest.inputs]
    return load_samples(samples, specs) if samples else proof_cases(specs, vocabularies(whole))


class Chain:
    """The stages of one pipeline as in-process onnxruntime sessions, run one after another."""

    def __init__(self, directory: Path, manifest: Manifest, threads: int | None = None) -> None:
        self.manifest = manifest
        self.sessions = [
            create_session(str(verify_stage_file(directory, s)), threads or manifest.profile.threads)
            for s in manifest.stages
        ]

    def run_all(self, feeds: dict[str, np.ndarray],
                before_each: Callable[[], object] | None = None) -> dict[str, np.ndarray]:
        """Every stage's outputs (the cut tensors and the final outputs) by name; `before_each` is called before
        each stage runs."""
        values = dict(feeds)
        for stage, session in zip(self.manifest.stages, self.sessions, strict=True):
            if before_each is not None:
                before_each()
            outs = session.run([t.name for t in stage.outputs], {t.name: values[t.name] for t in stage.inputs})
            values.update(zip([t.name for t in stage.outputs], outs, strict=True))
        return values

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.run_all(feeds)
        return {t.name: values[t.name] for t in self.manifest.outputs}


def resolve_source(directory: Path, manifest: Manifest, model_path: Path | None) -> Path:
    path = model_path or (directory / manifest.source_model.file)
    if not path.is_file():
        raise ExportError(
            f"the whole model {path} is missing; pass --model with the ONNX file the pipeline was split from"
        )
    return path


def _elem(t: TensorSpec) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(DATATYPE_TO_NUMPY[t.datatype]))


def prove_pipeline(directory: Path, model_path: Path | None = None, samples: Path | None = None,
                   tolerance: Tolerance = CHAIN_TOLERANCE, track: Track = lambda items, _: items) -> Proof:
    """Compare the chain with the whole model on every cut tensor and output; raise ExportError if they differ."""
    try:
        manifest = load_manifest(directory)
        chain = Chain(directory, manifest)
    except ManifestError as exc:
        raise ExportError(str(exc)) from exc
    source = resolve_source(directory, manifest, model_path)
    whole_model = load_onnx(source)
    cuts = [t for s in manifest.stages[:-1] for t in s.outputs]
    outputs = [t.name for t in manifest.outputs]
    compared = [*outputs, *[t.name for t in cuts]]
    try:
        whole = create_session(with_outputs(whole_model, {t.name: _elem(t) for t in cuts}).SerializeToString(),
                               manifest.profile.threads)
    except Exception as exc:  # onnxruntime's own types: the pipeline's tensors are not this model's
        same = sha256_file(source) == manifest.source_model.sha256
        raise ExportError(f"{source} does not have the pipeline's cut tensors and outputs "
                          f"({str(exc).splitlines()[0]}); expected the model the pipeline was split from "
                          f"({manifest.source_model.file}, sha256 {manifest.source_model.sha256[:12]}...)"
                          + ("" if same else ", and this file's sha256 differs")) from exc
    cases = cases_for(manifest, whole_model, samples)
    proof = Proof(tolerance, cases=len(cases))
    for case in track(cases, "verifying chain"):
        try:
            expected = dict(zip(compared, whole.run(compared, case.feeds), strict=True))
        except Exception as exc:  # onnxruntime's own error types: the model does not take these inputs
            proof.skip(case.label, str(exc))
            continue
        try:
            got = chain.run_all(case.feeds)
        except Exception as exc:  # a stage that cannot run fails the proof
            raise ExportError(f"the chained stages fail on {case.label}: {exc}") from exc
        for name in compared:
            if name in outputs:
                proof.observe_output(name, expected[name])
            proof.compare(name, expected[name], got[name], case.label)
    return proof.check("the chained stages differ from the whole model")


def verify_pipeline(directory: Path, model_path: Path | None = None, samples: Path | None = None,
                    tolerance: Tolerance = CHAIN_TOLERANCE, track: Track = lambda items, _: items) -> float:
    """Max |whole - chained| over the proof's cases (see `prove_pipeline`)."""
    return prove_pipeline(directory, model_path, samples, tolerance, track).max_abs_diff
