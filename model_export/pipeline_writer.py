"""Writing a pipeline directory from ONNX stage models: each stage's file, its tensors as its graph declares
them (dynamic dims by name), and `pipeline.json`. `split` writes its stages with it, and so do the tests
and the benchmarks that build small pipelines by hand, so every pipeline on disk is made the same way."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from model_export.errors import ExportError
from model_export.manifest import (
    NUMPY_TO_DATATYPE,
    Manifest,
    Profile,
    SourceModel,
    Stage,
    StageCost,
    TensorSpec,
    sha256_file,
    stage_name,
    write_manifest,
)
from model_export.onnx_io import save_onnx
from model_export.profile import param_bytes

DEFAULT_PROFILE = Profile(threads=1, batch=1, runs=1, balance="latency")


@dataclass(frozen=True)
class StageModel:
    """One stage to write; without a measured cost, its parameter bytes and bytes out per sample are counted
    from the graph and its latency is 0."""

    model: onnx.ModelProto
    cost: StageCost | None = None


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """A graph input or output as the manifest describes it: -1 and the dim's name where it is dynamic."""
    tensor_type = value.type.tensor_type
    numpy_name = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    if numpy_name not in NUMPY_TO_DATATYPE:
        raise ExportError(f"tensor {value.name!r} has dtype {numpy_name}, which has no KServe v2 datatype")
    shape, names = [], []
    for d in tensor_type.shape.dim:
        fixed = d.HasField("dim_value")
        shape.append(int(d.dim_value) if fixed else -1)
        names.append(None if fixed else (d.dim_param or None))
    return TensorSpec(name=value.name, datatype=NUMPY_TO_DATATYPE[numpy_name],  # type: ignore[arg-type]
                      shape=shape, dim_names=names if any(names) else None)


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [tensor_spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [tensor_spec(v) for v in model.graph.output]


def _counted_cost(model: onnx.ModelProto, outputs: list[TensorSpec]) -> StageCost:
    return StageCost(latency_ms=0.0, param_bytes=param_bytes(model),
                     bytes_out=sum(t.bytes_per_sample() for t in outputs))


def write_pipeline(directory: Path, name: str, stages: Sequence[onnx.ModelProto | StageModel], source: Path,
                   profile: Profile = DEFAULT_PROFILE, source_file: str | None = None,
                   external_data: bool = False) -> Manifest:
    """Write `stage-<i>.onnx` for each stage and `pipeline.json`; `source` is the whole model the stages
    were cut from (`source_file`: how the manifest refers to it, default its path relative to `directory`).
    `external_data`: each stage's weights go into `stage-<i>.onnx.data` beside it (`onnx_io.save_onnx`)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, stage in enumerate(stages):
        item = stage if isinstance(stage, StageModel) else StageModel(stage)
        file = f"stage-{i}.onnx"
        data_file = f"{file}.data" if external_data else None
        save_onnx(item.model, directory / file, data_file)
        data = ({"data_file": data_file, "data_sha256": sha256_file(directory / data_file)}
                if data_file is not None and (directory / data_file).is_file() else {})
        inputs, outputs = graph_io(item.model)
        written.append(Stage(name=stage_name(name, i), file=file, sha256=sha256_file(directory / file),
                             inputs=inputs, outputs=outputs, cost=item.cost or _counted_cost(item.model, outputs),
                             **data))
    manifest = Manifest(
        name=name,
        source_model=SourceModel(file=source_file or os.path.relpath(source.resolve(), directory.resolve()),
                                 sha256=sha256_file(source)),
        inputs=written[0].inputs,
        outputs=written[-1].outputs,
        profile=profile,
        stages=written,
    )
    write_manifest(manifest, directory)
    return manifest
