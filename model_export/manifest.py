"""The pipeline manifest, `pipeline.json`: the single source of truth every part reads.

Written by `model_export split`, read by the stage service, the local mesh, the Kubernetes renderer and
the load tester. Only pydantic and the standard library here, so the serving image can import it
without the export stack.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_export.errors import validation_problems

MANIFEST_FILE = "pipeline.json"
FORMAT_VERSION = 1

# KServe v2 datatype names, mapped to numpy dtype names (BYTES has no fixed-width numpy type).
DATATYPE_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_DATATYPE: dict[str, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]

# Stage and pipeline names become Kubernetes object names, service accounts and DNS labels (RFC 1123).
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_LABEL_MAX = 63
# A pipeline name is the prefix of its stages' names (`<pipeline>-stage-<i>`, then `-<version>` in
# Deployment names), so it must leave room for them inside one label.
PIPELINE_NAME_MAX = 40
SPLIT_DIGEST_CHARS = 8  # `s<n>-<8 hex>`: a pipeline's stage name, a split and a version still fit one label


def check_dns_label(value: str, max_length: int = DNS_LABEL_MAX) -> str:
    """Return `value` if it is a DNS label of at most `max_length` characters, else raise ValueError."""
    if not DNS_LABEL.match(value) or len(value) > max_length:
        raise ValueError(
            f"{value!r} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter "
            f"or digit, at most {max_length} characters)"
        )
    return value


def check_pipeline_name(value: str) -> str:
    return check_dns_label(value, PIPELINE_NAME_MAX)


DnsLabel = Annotated[str, AfterValidator(check_dns_label)]
"""A name that Kubernetes and Istio accept as an object name, a service account and a host label."""
PipelineName = Annotated[str, AfterValidator(check_pipeline_name)]
"""A DNS label short enough to prefix its stages' names."""


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent with the files beside it."""


class TensorSpec(BaseModel):
    """One tensor: `{"name": "image", "datatype": "FP32", "shape": [-1, 224, 224, 3]}`; -1 is dynamic.

    `dim_names`, where given, names each dynamic dimension (`["batch", "sequence", null]` beside a shape
    `[-1, -1, 16]`): two tensors' dimensions of the same name always have the same size."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int]
    dim_names: list[str | None] | None = None

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d < -1 for d in shape):
            raise ValueError(f"dimensions must be >= 0 or -1 (dynamic), got {shape}")
        return shape

    @model_validator(mode="after")
    def _names_fit_shape(self) -> TensorSpec:
        if self.dim_names is None:
            return self
        if len(self.dim_names) != len(self.shape):
            raise ValueError(f"dim_names {self.dim_names} must have one entry per dimension of {self.shape}")
        for size, name in zip(self.shape, self.dim_names, strict=True):
            if name is not None and size != -1:
                raise ValueError(f"dim_names {self.dim_names}: only dynamic (-1) dimensions of {self.shape} have names")
        return self

    def bytes_per_sample(self) -> int:
        """Bytes of one sample (the first dimension taken as the batch, other dynamic dims as 1)."""
        import numpy as np

        itemsize = np.dtype(DATATYPE_TO_NUMPY[self.datatype]).itemsize
        count = 1
        for d in self.shape[1:]:
            count *= max(d, 1)
        return count * itemsize


class StageCost(BaseModel):
    """What one stage costs, measured by the splitter at batch 1 with the stage service's thread count."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(ge=0)
    param_bytes: int = Field(ge=0)
    bytes_out: int = Field(ge=0, description="bytes per sample this stage sends to the next (or returns)")


class Stage(BaseModel):
    """One stage of the chain: its subgraph file and the tensors that cross its two cuts."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel
    version: DnsLabel = "v1"
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The weights in ONNX external data (`split --external-data`): onnxruntime maps them from this file beside
    # `file` instead of copying them out of the model (see model_export.onnx_io.save_onnx).
    data_file: str | None = None
    data_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    cost: StageCost

    @field_validator("file", "data_file")
    @classmethod
    def _plain_file(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or "\\" in value or value in {"", ".", ".."}):
            raise ValueError(f"stage file must be a plain file name beside pipeline.json, got {value!r}")
        return value

    @model_validator(mode="after")
    def _data_file_with_its_hash(self) -> Stage:
        if (self.data_file is None) != (self.data_sha256 is None):
            raise ValueError(f"stage {self.name}: data_file and data_sha256 go together (both or neither)")
        return self

    @property
    def files(self) -> list[tuple[str, str]]:
        """Every file of the stage with its sha256: the model, then its external data where it has any."""
        files = [(self.file, self.sha256)]
        if self.data_file is not None and self.data_sha256 is not None:
            files.append((self.data_file, self.data_sha256))
        return files


class SourceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Profile(BaseModel):
    """How costs were measured, so the numbers can be compared with the service's own."""

    model_config = ConfigDict(extra="forbid")

    threads: int = Field(ge=1)
    batch: int = Field(ge=1)
    runs: int = Field(ge=1)
    balance: Literal["latency", "params"]


class Manifest(BaseModel):
    """`pipeline.json`."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    name: PipelineName
    source_model: SourceModel
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    profile: Profile
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _chain_is_consistent(self) -> Manifest:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if [t.name for t in self.stages[0].inputs] != [t.name for t in self.inputs]:
            raise ValueError("the first stage's inputs must be the pipeline's inputs")
        if [t.name for t in self.stages[-1].outputs] != [t.name for t in self.outputs]:
            raise ValueError("the last stage's outputs must be the pipeline's outputs")
        for prev, nxt in zip(self.stages, self.stages[1:], strict=False):
            if {t.name for t in prev.outputs} != {t.name for t in nxt.inputs}:
                raise ValueError(
                    f"stage {prev.name} outputs {[t.name for t in prev.outputs]} but "
                    f"{nxt.name} expects {[t.name for t in nxt.inputs]}"
                )
        return self

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; the pipeline has {[s.name for s in self.stages]}")

    def index(self, name: str) -> int:
        return [s.name for s in self.stages].index(self.stage(name).name)

    @property
    def split_id(self) -> str:
        """The split's name, `s<stages>-<8 hex>`: a digest of the tensors at every cut (names, datatypes, shapes).

        Two manifests of one model with the same id fit stage for stage (a retrained stage keeps it); a new
        split that moves, adds or removes a cut gets another. The mesh pins each request to one split by it
        (`x-pipeline-version`), so no request crosses two splits whose stages do not fit together."""
        cuts = [[t.model_dump(exclude={"dim_names"}) for t in s.inputs] for s in self.stages]
        cuts.append([t.model_dump(exclude={"dim_names"}) for t in self.outputs])
        text = json.dumps({"pipeline": self.name, "cuts": cuts}, sort_keys=True, separators=(",", ":"))
        return f"s{len(self.stages)}-{hashlib.sha256(text.encode()).hexdigest()[:SPLIT_DIGEST_CHARS]}"


def stage_name(pipeline: str, index: int) -> str:
    return f"{pipeline}-stage-{index}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: Path | str) -> Manifest:
    """Read `pipeline.json` (or the directory that holds it). Raises ManifestError with the reason."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / MANIFEST_FILE
        found = path.is_file()
    except OSError as exc:  # a name too long, say
        raise ManifestError(f"{str(path)[:200]}: not a path to a manifest ({exc.strerror})") from None
    if not found:
        raise ManifestError(f"{path}: no manifest here; expected the {MANIFEST_FILE} that `split` writes")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable JSON manifest ({exc})") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: invalid manifest: {validation_problems(exc)}") from None


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def verify_stage_file(manifest_dir: Path, stage: Stage) -> Path:
    """Return the stage's ONNX path after checking it (and its external data file, where it has one) exists
    and its sha256 matches the manifest."""
    for file, expected in stage.files:
        path = manifest_dir / file
        if not path.is_file():
            raise ManifestError(f"stage {stage.name}: file {path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"stage {stage.name}: {path} has sha256 {actual}, but the manifest expects {expected}; "
                "the file was changed or replaced after the split"
            )
    return manifest_dir / stage.file
