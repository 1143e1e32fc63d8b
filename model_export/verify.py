"""The equivalence proof: the chained stages compute what the whole model computes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from model_export.errors import ExportError
from model_export.manifest import Manifest, ManifestError, load_manifest, verify_stage_file
from model_export.ort_session import create_session
from model_export.samples import random_tensors

DEFAULT_TOLERANCE = 1e-5


def pipeline_inputs(manifest: Manifest, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for the pipeline as its manifest describes them."""
    return random_tensors(manifest.inputs, batch, seed)


class Chain:
    """The stages of one pipeline as in-process onnxruntime sessions, run one after another."""

    def __init__(self, directory: Path, manifest: Manifest, threads: int | None = None) -> None:
        self.manifest = manifest
        self.sessions = [
            create_session(str(verify_stage_file(directory, s)), threads or manifest.profile.threads)
            for s in manifest.stages
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feeds)
        for stage, session in zip(self.manifest.stages, self.sessions, strict=True):
            outs = session.run([t.name for t in stage.outputs], {t.name: values[t.name] for t in stage.inputs})
            values = dict(zip([t.name for t in stage.outputs], outs, strict=True))
        return values


def resolve_source(directory: Path, manifest: Manifest, model_path: Path | None) -> Path:
    path = model_path or (directory / manifest.source_model.file)
    if not path.is_file():
        raise ExportError(
            f"the whole model {path} is missing; pass --model with the ONNX file the pipeline was split from"
        )
    return path


def verify_pipeline(directory: Path, model_path: Path | None = None, samples: int = 3, batch: int = 2,
                    tolerance: float = DEFAULT_TOLERANCE,
                    track: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items) -> float:
    """Max |whole - chained| over `samples` random batches; raise ExportError above `tolerance`."""
    try:
        manifest = load_manifest(directory)
        chain = Chain(directory, manifest)
    except ManifestError as exc:
        raise ExportError(str(exc)) from exc
    whole = create_session(str(resolve_source(directory, manifest, model_path)), manifest.profile.threads)
    names = [t.name for t in manifest.outputs]
    worst = 0.0
    for seed in track(range(samples), "verifying chain"):
        feeds = pipeline_inputs(manifest, batch, seed)
        expected = whole.run(names, feeds)
        got = chain.run(feeds)
        for name, e in zip(names, expected, strict=True):
            if got[name].shape != e.shape:
                raise ExportError(f"output {name!r}: chained shape {got[name].shape} differs from whole {e.shape}")
            worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - e))))
    if worst > tolerance:
        raise ExportError(
            f"the chained stages differ from the whole model: max |diff| = {worst:.3g} over {samples} random "
            f"batches, above the tolerance {tolerance:g}"
        )
    return worst
