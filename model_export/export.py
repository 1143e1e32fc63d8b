"""Keras -> ONNX with tf2onnx, proven against Keras's own predictions (see `proof`).

The converted model keeps the source's input and output names and its dynamic dimensions, named:
`batch` first, then `sequence`, `height`, `width` or `<input>_dim<axis>` by the input's rank, and
each output's dimensions by the input dimension they follow (found by running the model, see `dims`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from model_export.dims import BATCH_DIM, UNNAMED, InputSpec, graph_inputs, infer_dims, probe_sizes
from model_export.errors import ExportError
from model_export.keras_source import KerasInput, Source, load_source
from model_export.onnx_io import load_onnx, save_onnx
from model_export.ort_session import create_session
from model_export.proof import EXPORT_TOLERANCE, Proof, Tolerance
from model_export.samples import Case, feeds_at, load_samples, proof_cases, vocabularies

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    path: Path
    proof: Proof
    inputs: list[str]
    outputs: list[str]


def _base_dim_name(rank: int, axis: int) -> str:
    if rank in (2, 3) and axis == 1:
        return "sequence"
    if rank == 4 and axis in (1, 2):
        return ("height", "width")[axis - 1]
    return f"dim{axis}"


def input_dim_names(inputs: list[KerasInput]) -> dict[tuple[str, int], str]:
    """(input, axis) -> name of every dynamic dimension; a name several inputs would share gets a prefix."""
    bases = {(i.name, axis + 1): _base_dim_name(len(i.dims) + 1, axis + 1)
             for i in inputs for axis, d in enumerate(i.dims) if d is None}
    counts = Counter(bases.values())
    names = {(i.name, 0): BATCH_DIM for i in inputs}
    for (name, axis), base in bases.items():
        names[(name, axis)] = base if counts[base] == 1 and not base.startswith("dim") else f"{name}_{base}"
    return names


def _set_dim(value: onnx.ValueInfoProto, axis: int, dim: int | str) -> None:
    d = value.type.tensor_type.shape.dim[axis]
    if isinstance(dim, int):
        d.dim_value = dim
    else:
        d.dim_param = dim


def name_input_dims(proto: onnx.ModelProto, inputs: list[KerasInput]) -> None:
    names = input_dim_names(inputs)
    for value in proto.graph.input:
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and (value.name, axis) in names:
                _set_dim(value, axis, names[(value.name, axis)])


def converted_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """An onnxruntime session of what tf2onnx wrote; ExportError where onnxruntime cannot load it (tf2onnx keeps
    a TensorFlow op it has no ONNX form for, e.g. Bitcast for keras.ops.argmax, as a node onnxruntime lacks)."""
    try:
        return create_session(proto.SerializeToString())
    except Exception as exc:  # onnxruntime's own types (InvalidGraph, NotImplemented, Fail)
        unknown = sorted({n.op_type for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain)})
        hint = f" (ops that are not ONNX's: {', '.join(unknown)})" if unknown else ""
        raise ExportError(f"onnxruntime cannot load the converted model{hint}: {str(exc).splitlines()[0]}; "
                          "expected layers tf2onnx converts to ONNX ops (its 'Unsupported ops' line above names "
                          "the TensorFlow ops it could not convert): replace or drop those layers") from exc


def name_output_dims(proto: onnx.ModelProto, session: ort.InferenceSession, specs: list[InputSpec],
                     vocab: dict[str, int]) -> None:
    """Name each output's dynamic dims after the input dimension they follow, found by two runs."""
    first, second = probe_sizes(specs)
    try:
        runs = [session.run(None, feeds_at(specs, sizes, vocab)) for sizes in (first, second)]
    except Exception as exc:  # onnxruntime's own types
        raise ExportError(f"the converted model fails on inputs with the dynamic dims at {first} and {second}: "
                          f"{exc}; expected a model that takes any size of its dynamic dimensions") from exc
    for k, value in enumerate(proto.graph.output):
        dims = infer_dims(runs[0][k].shape, runs[1][k].shape, (first, second))
        for axis, dim in enumerate(dims):
            if not value.type.tensor_type.shape.dim[axis].HasField("dim_value"):
                _set_dim(value, axis, f"{value.name}_dim{axis}" if dim == UNNAMED else dim)


def prove_against_source(source: Source, proto: onnx.ModelProto, session: ort.InferenceSession, cases: list[Case],
                         tolerance: Tolerance) -> Proof:
    names = [o.name for o in proto.graph.output]
    proof = Proof(tolerance, cases=len(cases))
    for case in cases:
        try:
            expected = source.predict(case.feeds)
        except Exception as exc:  # Keras and TensorFlow raise many types for inputs a model does not take
            proof.skip(case.label, f"{type(exc).__name__}: {exc}")
            continue
        if sorted(expected) != sorted(names):
            raise ExportError(f"the converted model's outputs {names} are not the source's {sorted(expected)}")
        try:
            outputs = session.run(None, case.feeds)
        except Exception as exc:  # onnxruntime's own types
            raise ExportError(f"Keras runs {case.label} but onnxruntime fails on it: {exc}") from exc
        for name, got in zip(names, outputs, strict=True):
            proof.observe_output(name, expected[name])
            proof.compare(name, expected[name], got, case.label)
    return proof


def export_keras(model_path: Path, out: Path, opset: int = DEFAULT_OPSET, tolerance: Tolerance = EXPORT_TOLERANCE,
                 samples: Path | None = None, unsafe: bool = False) -> ExportResult:
    """Convert, name the dynamic dims, then prove onnxruntime equals the source on realistic inputs."""
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if not 7 <= opset <= 21:
        raise ExportError(f"--opset must be between 7 and 21 (what tf2onnx and onnxruntime share), got {opset}")
    source = load_source(model_path, unsafe)
    try:
        proto = source.convert(opset)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{model_path}: tf2onnx could not convert the model ({type(exc).__name__}: {exc})") from exc
    name_input_dims(proto, source.inputs)
    specs, vocab = graph_inputs(proto), vocabularies(proto)
    session = converted_session(proto)
    name_output_dims(proto, session, specs, vocab)
    cases = load_samples(samples, specs) if samples else proof_cases(specs, vocab)
    proof = prove_against_source(source, proto, session, cases, tolerance)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp) / out.name
        save_onnx(proto, tmp_path)
        load_onnx(tmp_path)  # the checker must accept what tf2onnx wrote
        proof.check("the export differs from Keras; nothing was written")
        tmp_path.replace(out)
    return ExportResult(out, proof, [s.name for s in specs], [o.name for o in proto.graph.output])
