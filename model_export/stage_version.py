"""A new version of one stage, written as a new pipeline directory beside the old one.

Every other stage's file is copied byte for byte (so its sha256, and hence check-contract, says it did not
change); the one stage gets `stage-K-vN.onnx`, its version bumped, its tensors read from its graph, and
the manifest is rewritten. Nothing is written unless the whole new directory can be.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx
from pydantic import ValidationError

from model_export.errors import ExportError
from model_export.manifest import (
    Manifest,
    SourceModel,
    StageCost,
    load_manifest,
    sha256_file,
    verify_stage_file,
    write_manifest,
)
from model_export.onnx_io import save_onnx
from model_export.pipeline_writer import graph_io
from model_export.split import make_readable

VERSION = re.compile(r"^v(\d+)$")


def next_version(version: str) -> int:
    """`v1` -> 2; a version not of the form vN cannot be bumped."""
    match = VERSION.match(version)
    if not match:
        raise ExportError(f"stage version {version!r} is not of the form vN, so it cannot be bumped")
    return int(match.group(1)) + 1


def _source(old_dir: Path, new_dir: Path, work: Path, manifest: Manifest, source: Path | None) -> SourceModel:
    if source is None:  # the same whole model: refer to the old one from the new directory
        old_source = (old_dir / manifest.source_model.file).resolve()
        return SourceModel(file=os.path.relpath(old_source, new_dir.resolve()), sha256=manifest.source_model.sha256)
    shutil.copyfile(source, work / "model.onnx")
    return SourceModel(file="model.onnx", sha256=sha256_file(work / "model.onnx"))


def write_stage_version(old_dir: Path, new_dir: Path, stage: str, model: onnx.ModelProto,
                        cost: StageCost | None = None, source: Path | None = None) -> Manifest:
    """Write `new_dir`: `old_dir`'s pipeline with `stage` replaced by `model` as its next version.

    `source`: the whole model the new stage was cut from (copied in as model.onnx); None keeps the old one.
    The new stage must declare the same tensors as the old (see contract.check_contract for the full check)."""
    old = load_manifest(old_dir)
    try:
        index = old.index(stage)
    except KeyError as exc:
        raise ExportError(str(exc.args[0])) from exc
    if new_dir.exists():
        raise ExportError(f"--out {new_dir} already exists; expected a new directory")
    was = old.stages[index]
    version = next_version(was.version)
    inputs, outputs = graph_io(model)
    new_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=new_dir.parent, prefix=f".{new_dir.name}.") as tmp:
        work = Path(tmp)
        stages = []
        for i, s in enumerate(old.stages):
            if i != index:
                verify_stage_file(old_dir, s)
                for file, _ in s.files:
                    shutil.copyfile(old_dir / file, work / file)
                stages.append(s)
                continue
            file = f"stage-{index}-v{version}.onnx"
            save_onnx(model, work / file)
            stages.append(s.model_copy(update={
                "version": f"v{version}", "file": file, "sha256": sha256_file(work / file), "inputs": inputs,
                "outputs": outputs, "cost": cost or s.cost}))
        try:
            manifest = Manifest.model_validate({
                **old.model_dump(), "stages": [s.model_dump() for s in stages],
                "source_model": _source(old_dir, new_dir, work, old, source).model_dump()})
        except ValidationError as exc:
            raise ExportError(f"the new {stage} does not fit its neighbours: {exc.errors()[0]['msg']}") from exc
        write_manifest(manifest, work)
        make_readable(work)
        Path(tmp).rename(new_dir)
        Path(tmp).mkdir()  # TemporaryDirectory removes its own path on exit
    return manifest
