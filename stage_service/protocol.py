"""KServe v2 / Open Inference Protocol (REST): pydantic v2 models and the binary tensor codec.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ and Triton's binary
tensor data extension: a body is a JSON header of `Inference-Header-Content-Length` bytes followed by the
raw little-endian, row-major bytes of every tensor whose `parameters.binary_data_size` is set, in the
order the tensors appear in the header.

This module only turns bytes into named numpy arrays and back, checking that each tensor is consistent
with itself (datatype known, data matching the shape). Whether the tensors fit the model is checked in
`runtime.py`. Every problem raises `InvalidInput` naming the tensor.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import orjson
import simdjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, ValidationError

from model_export.errors import validation_problems
from model_export.manifest import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, TensorSpec
from stage_service.errors import InvalidInput, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
# Parameters of the binary extension: they steer encoding and are not echoed back.
BINARY_PARAMS = frozenset({"binary_data", "binary_data_output", "binary_data_size"})
MAX_DIMS = 64  # numpy's own limit
# `parameters` are echoed back; orjson writes at most 255 levels, and no client needs more than a few.
MAX_PARAMETER_DEPTH = 32
# JSON request headers at least this large have their inputs' numeric `data` parsed by simdjson
# (`_numeric_inputs`); smaller ones, and anything simdjson refuses, by orjson.
FAST_JSON_MIN_BYTES = 64 << 10
_BUFFER_KINDS: dict[str, Literal["d", "i", "u"]] = {**dict.fromkeys(("FP16", "FP32", "FP64"), "d"),
                 **dict.fromkeys(("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"), "i"), "UINT64": "u"}
_BUFFER_DTYPES = {"d": np.float64, "i": np.int64, "u": np.uint64}


# ----------------------------------------------------------------------------------------------- models


class InferTensor(BaseModel):
    """A tensor of a request's `inputs` or a response's `outputs`, which the spec gives the same shape:
    `{"name": $string, "shape": [$number, ...], "datatype": $string, "parameters": {...}, "data": [...]}`"""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[StrictInt]  # numbers, as the spec writes it: "1" or true is refused, not read as 1
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None
    # `data` already parsed into a flat array (`_numeric_inputs`); `data` is then [].
    _parsed: np.ndarray | None = PrivateAttr(default=None)


class RequestOutput(BaseModel):
    """`{"name": $string, "parameters": {"binary_data": $bool, ...}}`"""

    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """`{"id": $string, "parameters": {...}, "inputs": [$request_input, ...], "outputs": [$request_output, ...]}`"""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class InferenceResponse(BaseModel):
    """`{"model_name": $string, "model_version": $string, "id": $string, "parameters": {...},
    "outputs": [$response_output, ...]}`"""

    model_config = ConfigDict(protected_namespaces=(), extra="ignore")

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferTensor]


class MetadataTensor(BaseModel):
    """`{"name": $string, "datatype": $string, "shape": [$number, ...]}`"""

    name: str
    datatype: str
    shape: list[int]

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> MetadataTensor:
        return cls(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


class ModelMetadata(BaseModel):
    """`{"name": $string, "versions": [$string, ...], "platform": $string, "inputs": [...], "outputs": [...]}`
    plus `parameters` (this stage, its place in the pipeline)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    """`{"name": $string, "version": $string, "extensions": [$string, ...]}`"""

    name: str
    version: str
    extensions: list[str]


# ---------------------------------------------------------------------------------------------- decoding


def _numpy_dtype(name: str, datatype: str) -> np.dtype[Any]:
    numpy_name = DATATYPE_TO_NUMPY.get(datatype)
    if numpy_name is None:
        raise InvalidInput(
            f"tensor {name}: unsupported datatype {datatype!r}; expected one of {sorted(DATATYPE_TO_NUMPY)}"
        )
    return np.dtype(numpy_name).newbyteorder("<")


def _element_count(name: str, shape: Sequence[int], body_bytes: int) -> int:
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"tensor {name}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"tensor {name}: shape {list(shape)} has a negative dimension; expected sizes >= 1")
    if 0 in shape:
        # batch 0 included: a request with nothing to infer is refused rather than answered empty
        raise InvalidInput(f"tensor {name}: shape {list(shape)} has a dimension of 0, so no values; "
                           "expected sizes >= 1 (at least one sample)")
    count = math.prod(shape)
    # Every element takes at least one byte of the body, binary or JSON: a bigger shape is absurd.
    if count > body_bytes:
        raise InvalidInput(
            f"tensor {name}: shape {list(shape)} has {count} elements, more than a {body_bytes}-byte body can hold"
        )
    return count


def _from_json_data(name: str, datatype: str, dtype: np.dtype[Any], shape: list[int], count: int,
                    data: list[Any]) -> np.ndarray:
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"tensor {name}: data is not a rectangular array of numbers ({exc})") from exc
    return _checked_json_array(name, datatype, dtype, shape, count, raw)


def _checked_json_array(name: str, datatype: str, dtype: np.dtype[Any], shape: list[int], count: int,
                        raw: np.ndarray) -> np.ndarray:
    """JSON `data` as an array of `datatype` and `shape`: InvalidInput naming the tensor where the count, the
    kind of values or their range does not fit."""
    if raw.size != count:
        raise InvalidInput(f"tensor {name}: data has {raw.size} elements but shape {shape} needs {count}")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    kind = raw.dtype.kind
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if not ok:
        wanted = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        raise InvalidInput(f"tensor {name}: data must hold {wanted} for datatype {datatype}, got "
                           f"{_KIND_WORDS.get(kind, 'mixed values')}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"tensor {name}: values [{low}, {high}] are out of range for {datatype} [{info.min}, {info.max}]"
            )
    elif dtype.kind == "f":
        largest, biggest = max(float(raw.max()), -float(raw.min())), float(np.finfo(dtype).max)
        if largest > biggest:  # would become inf
            raise InvalidInput(f"tensor {name}: a value of magnitude {largest:g} is out of range for {datatype} "
                               f"(largest {biggest:g})")
    return raw.astype(dtype, copy=False).reshape(shape)


def _decode_tensors(tensors: Sequence[InferTensor], body: bytes,
                    offset: int, what: str) -> dict[str, np.ndarray]:
    """Arrays for JSON `data` or binary sections starting at `offset`, checking the sections fill the body."""
    arrays: dict[str, np.ndarray] = {}
    total = len(body)
    for tensor in tensors:
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"tensor {name}: appears twice in the {what}")
        dtype = _numpy_dtype(name, tensor.datatype)
        count = _element_count(name, tensor.shape, total)
        params = tensor.parameters or {}
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"tensor {name}: binary_data_size must be a non-negative integer, got {size!r}")
            expected = count * dtype.itemsize
            if size != expected:
                raise InvalidInput(
                    f"tensor {name}: binary_data_size is {size} bytes but shape {tensor.shape} of "
                    f"{tensor.datatype} needs {expected}"
                )
            if offset + size > total:
                raise InvalidInput(
                    f"tensor {name}: the binary body is shorter than its header says: {size} bytes declared "
                    f"at offset {offset}, only {max(total - offset, 0)} present"
                )
            arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(tensor.shape)
            offset += size
        elif tensor._parsed is not None:
            arrays[name] = _checked_json_array(name, tensor.datatype, dtype, tensor.shape, count, tensor._parsed)
        elif tensor.data is not None:
            arrays[name] = _from_json_data(name, tensor.datatype, dtype, tensor.shape, count, tensor.data)
        else:
            raise InvalidInput(f"tensor {name}: has neither 'data' nor parameters.binary_data_size")
    if offset != total:
        raise InvalidInput(
            f"the binary body is longer than its header says: {total - offset} bytes after the last tensor"
        )
    return arrays


def _split_header(body: bytes, header_length: str | None) -> tuple[bytes, int]:
    if header_length is None:
        return body, len(body)
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH}: expected a byte count, got {header_length!r}") from None
    if length < 0 or length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH}: {length} is not within the body's {len(body)} bytes")
    return body[:length], length


# What JSON `data` held, by the kind of the array numpy made of it.
_KIND_WORDS = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers with a fraction or exponent",
               "U": "strings", "S": "strings", "O": "mixed values"}
_NON_JSON_NUMBER = re.compile(rb"[\[,:]\s*-?(NaN|Infinity)\b")


def _loads(header: bytes, what: str, framed: bool = False) -> Any:
    """The JSON header (orjson: a third faster than pydantic's parser on a large `data` list); `framed`: its length
    came from Inference-Header-Content-Length, which the message then names."""
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"invalid inference {what}: {_not_json(header, exc, framed)}") from None


_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")


def _json_then_more(body: bytes, exc: orjson.JSONDecodeError) -> bool:
    """Whether `body` looks like a JSON object followed by other bytes (binary tensors sent without their framing
    header): an object whose parse failed on content after it, or on bytes that are not UTF-8 (orjson checks
    those first). Cheap: no second parse of a body that may be megabytes."""
    space = _LEADING_SPACE.match(body)
    start = space.end() if space else 0
    said = str(exc)
    return body[start:start + 1] == b"{" and ("unexpected content after document" in said or "not valid UTF-8" in said)


def _not_json(header: bytes, exc: orjson.JSONDecodeError, framed: bool) -> str:
    """Why a header is not JSON, with the likely cause: non-JSON numbers, or the binary framing."""
    if _NON_JSON_NUMBER.search(header):
        return (f"the body is not valid JSON ({exc}); JSON has no NaN or Infinity: send such values in binary "
                "(the binary tensor extension)")
    if framed:
        return (f"the first {len(header)} bytes of the body ({HEADER_LENGTH}) are not valid JSON ({exc}); "
                f"{HEADER_LENGTH} must be the JSON header's length in bytes")
    if _json_then_more(header, exc):
        return (f"the body is not valid JSON ({exc}); a body whose JSON is followed by binary tensors needs "
                f"{HEADER_LENGTH}: the JSON's length in bytes")
    return f"the body is not valid JSON ({exc})"


def _plain(value: Any) -> Any:
    """A simdjson value as Python objects."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _flat_numbers(data: Any, datatype: Any) -> np.ndarray | None:
    """A flat JSON array of numbers as one array (float64 for a float datatype, int64 or uint64 for an integer
    one), parsed straight from the text; None for anything else (nested, mixed, booleans, out of range)."""
    kind = _BUFFER_KINDS.get(datatype) if isinstance(datatype, str) else None
    if kind is None or not isinstance(data, simdjson.Array):
        return None
    try:
        array = np.frombuffer(data.as_buffer(of_type=kind), dtype=_BUFFER_DTYPES[kind])
    except (TypeError, ValueError):
        return None
    return array if array.size == len(data) else None


_simdjson = threading.local()


def _parse(header: bytes) -> Any:
    """The document, parsed by this thread's parser, kept between requests: a fresh one allocates (and faults
    in) its buffers for every document, +10 ms at 8 MB; a kept one holds them, sized to the largest document
    seen (about 3x its size). simdjson refuses to reuse a parser while a value of its last document is alive
    (`_numeric_inputs` copies every value out, but a traceback may hold one): then a fresh parser takes over."""
    parser = getattr(_simdjson, "parser", None)
    if parser is not None:
        try:
            return parser.parse(header)
        except RuntimeError:
            pass
    parser = _simdjson.parser = simdjson.Parser()
    return parser.parse(header)


def _numeric_inputs(header: bytes) -> tuple[dict[str, Any], dict[int, np.ndarray]] | None:
    """The request, with each input's flat numeric `data` parsed by simdjson straight into an array and left
    out of the document (its `data` is then []): no Python object per value, about 4x faster than orjson and
    numpy at 800k values. None where simdjson refuses the text or an input is not an object: the plain path
    then answers, with its own messages."""
    try:
        doc = _parse(header)
    except ValueError:
        return None
    if not isinstance(doc, simdjson.Object):
        return None
    request: dict[str, Any] = {}
    arrays: dict[int, np.ndarray] = {}
    for key in doc:
        value = doc[key]
        if key != "inputs" or not isinstance(value, simdjson.Array):
            request[key] = _plain(value)
            continue
        inputs: list[Any] = []
        for i, item in enumerate(value):
            if not isinstance(item, simdjson.Object):
                return None
            entry = {field: _plain(item[field]) for field in item if field != "data"}
            if "data" in item:
                array = _flat_numbers(item["data"], entry.get("datatype"))
                if array is None:
                    entry["data"] = _plain(item["data"])
                else:
                    entry["data"], arrays[i] = [], array
            inputs.append(entry)
        request["inputs"] = inputs
    return request, arrays


def _loads_request(header: bytes, framed: bool = False) -> tuple[Any, dict[int, np.ndarray]]:
    """The JSON header, and the inputs' `data` already parsed into arrays where it is large (by index)."""
    if len(header) >= FAST_JSON_MIN_BYTES:
        fast = _numeric_inputs(header)
        if fast is not None:
            return fast
    return _loads(header, "request", framed), {}


def _count_json_values(header: bytes, limit: int | None) -> None:
    """PayloadTooLarge if the JSON may hold more than `limit` values: every list, object and comma counts
    (bytes.count, before any parsing), so that the memory parsing takes stays bounded (~80 bytes a value)."""
    if limit is None or len(header) <= limit:
        return  # fewer bytes than the limit: fewer values too (a binary request's header, every time)
    octets = np.frombuffer(header, np.uint8)  # numpy compares in bulk: 3.5x bytes.count at 8 MB
    count = sum(int(np.count_nonzero(octets == ord(c))) for c in ",[{")
    if count > limit:
        raise PayloadTooLarge(f"the request's JSON holds about {count} values, over the limit of {limit} "
                              "(STAGE_MAX_JSON_VALUES); send large tensors in binary (the binary tensor extension)")


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (a scalar: 0); iterative, as they may nest 1000 deep."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _check_parameters(where: str, parameters: dict[str, Any] | None, flags: Sequence[str]) -> None:
    """`parameters` nest at most MAX_PARAMETER_DEPTH deep; the binary extension's flags are true/false."""
    if not parameters:
        return
    depth = _depth(parameters)
    if depth > MAX_PARAMETER_DEPTH:
        raise InvalidInput(f"{where}parameters nest {depth} levels deep; at most {MAX_PARAMETER_DEPTH}")
    for flag in flags:
        value = parameters.get(flag)
        if value is not None and not isinstance(value, bool):
            raise InvalidInput(f"{where}parameters.{flag} must be true or false, got {value!r}")


def _check_request(request: InferenceRequest) -> None:
    _check_parameters("", request.parameters, ["binary_data_output"])
    for tensor in request.inputs:
        _check_parameters(f"input {tensor.name}: ", tensor.parameters, ["binary_data"])
    for out in request.outputs or []:
        _check_parameters(f"output {out.name}: ", out.parameters, ["binary_data"])


def decode_request(body: bytes, header_length: str | None, max_json_values: int | None = None,
                   sections: Sequence[bytes] | None = None) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """Parse a JSON or binary-extension request body into the request and its input arrays; refuse (413)
    a JSON header of more than `max_json_values` values before parsing it. `sections`: the binary tensors
    apart from `body` (then the header alone), in order, as if they followed it."""
    header, offset = _split_header(body, header_length)
    _count_json_values(header, max_json_values)
    document, parsed = _loads_request(header, header_length is not None)
    try:
        request = InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput(f"invalid inference request: {validation_problems(exc)}") from None
    for index, array in parsed.items():
        request.inputs[index]._parsed = array
    _check_request(request)
    if sections is not None:
        return request, _decode_sections(request.inputs, sections)
    return request, _decode_tensors(request.inputs, body, offset, "request")


def _decode_sections(tensors: Sequence[InferTensor], sections: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Arrays for binary tensors whose bytes come as one section each, in order (`decode_request`): the checks
    of `_decode_tensors`, each section standing for its stretch of a body."""
    binary = [t for t in tensors if (t.parameters or {}).get("binary_data_size") is not None]
    if len(binary) != len(sections) or len(binary) != len(tensors):
        raise InvalidInput(f"{len(sections)} binary sections for {len(tensors)} tensors, {len(binary)} of them "
                           "binary; expected one section per tensor")
    arrays: dict[str, np.ndarray] = {}
    for tensor, section in zip(tensors, sections, strict=True):
        if tensor.name in arrays:
            raise InvalidInput(f"tensor {tensor.name}: appears twice in the request")
        arrays.update(_decode_tensors([tensor], section, 0, "request"))
    return arrays


def decode_response(body: bytes, header_length: str | None) -> tuple[InferenceResponse, dict[str, np.ndarray]]:
    """Parse a JSON or binary-extension response body (the next stage's answer)."""
    header, offset = _split_header(body, header_length)
    try:
        response = InferenceResponse.model_validate(_loads(header, "response", header_length is not None))
    except ValidationError as exc:
        raise InvalidInput(f"invalid inference response: {validation_problems(exc)}") from None
    return response, _decode_tensors(response.outputs, body, offset, "response")


# ---------------------------------------------------------------------------------------------- encoding


def datatype_of(array: np.ndarray) -> str:
    return NUMPY_TO_DATATYPE[array.dtype.name]


def _dumps(header: dict[str, Any] | BaseModel) -> bytes:
    """JSON of a header whose tensors may hold numpy arrays as `data`: orjson writes those straight from
    the array (float32 in its shortest exact form), about 4x faster than via Python lists."""
    if isinstance(header, BaseModel):
        return header.model_dump_json(exclude_none=True).encode()
    return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)


def _byte_view(array: np.ndarray) -> memoryview:
    """The array's bytes, row-major, without a copy where it is contiguous already (a flat uint8 view:
    memoryview.cast refuses zero-size shapes)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _join(header: dict[str, Any] | BaseModel, sections: list[np.ndarray]) -> tuple[bytes, int | None]:
    head = _dumps(header)
    if not sections:
        return head, None
    # One copy of each tensor, straight into the body; memoryview avoids tobytes()' extra copy.
    return b"".join([head, *(_byte_view(a) for a in sections)]), len(head)


def _json_data(array: np.ndarray) -> np.ndarray:
    """The array as orjson can write it: flat, contiguous, native byte order."""
    flat = np.ascontiguousarray(array).ravel()
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))


def encode_request(tensors: Mapping[str, np.ndarray], request_id: str | None = None,
                   parameters: Mapping[str, Any] | None = None) -> tuple[bytes, int]:
    """A binary-extension request with every input binary and every output asked for in binary."""
    parts, length = encode_request_parts(tensors, request_id, parameters)
    return b"".join(parts), length


def encode_request_parts(tensors: Mapping[str, np.ndarray], request_id: str | None = None,
                         parameters: Mapping[str, Any] | None = None) -> tuple[list[bytes | memoryview], int]:
    """`encode_request`'s body as its parts, in order: the JSON header, then each tensor's own buffer (no
    copy of a contiguous array), for a writer that sends them one after another (`http1.Http1Client`).
    The arrays must stay unchanged until the parts are sent."""
    inputs = [
        {"name": name, "shape": list(a.shape), "datatype": datatype_of(a),
         "parameters": {"binary_data_size": a.nbytes}}
        for name, a in tensors.items()
    ]
    header: dict[str, Any] = {"inputs": inputs, "parameters": {**(parameters or {}), "binary_data_output": True}}
    if request_id is not None:
        header["id"] = request_id
    head = _dumps(header)
    return [head, *(_byte_view(a) for a in tensors.values())], len(head)


def encode_json_request(tensors: Mapping[str, np.ndarray], request_id: str | None = None,
                        binary_output: bool = False) -> bytes:
    """A plain JSON request (for clients and the benchmark; stages never send this to each other)."""
    header: dict[str, Any] = {
        "inputs": [{"name": n, "shape": list(a.shape), "datatype": datatype_of(a), "data": _json_data(a)}
                   for n, a in tensors.items()],
    }
    if request_id is not None:
        header["id"] = request_id
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    return _dumps(header)


def request_body(tensors: Mapping[str, np.ndarray], binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request as a client sends it: binary tensors (outputs asked for in
    binary too) or plain JSON."""
    if binary:
        body, length = encode_request(tensors)
        return body, {"content-type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(length)}
    return encode_json_request(tensors), {"content-type": JSON_CONTENT_TYPE}


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    parameters: Mapping[str, Any] | None,
                    outputs: Sequence[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """The response body and, where any output is binary, the JSON header's length.

    `outputs` holds (name, array, binary) in the order to return them. The header has the shape of
    `InferenceResponse`; it is written as a dict so that JSON tensors go from numpy to text directly.
    """
    listed: list[dict[str, Any]] = []
    sections = []
    for name, array, binary in outputs:
        out: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if binary:
            out["parameters"] = {"binary_data_size": array.nbytes}
            sections.append(array)
        else:
            _check_json_representable(name, array)
            out["data"] = _json_data(array)
        listed.append(out)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    header["outputs"] = listed
    return _join(header, sections)


def _check_json_representable(name: str, array: np.ndarray) -> None:
    """JSON has no NaN or infinity (orjson would write null): such an output can only go back binary."""
    # min and max carry any NaN or infinity along without an array of flags; the count only for the message
    if array.dtype.kind == "f" and array.size and not (math.isfinite(array.min()) and math.isfinite(array.max())):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InvalidInput(f"output {name}: {bad} of {array.size} values are NaN or infinite, which JSON cannot "
                               "carry; ask for it in binary (parameters.binary_data: true)")


def wants_binary(request: InferenceRequest, name: str) -> bool:
    """Whether output `name` goes back binary: its own `binary_data`, else the request's `binary_data_output`."""
    for out in request.outputs or []:
        if out.name == name and out.parameters and "binary_data" in out.parameters:
            return bool(out.parameters["binary_data"])
    return bool((request.parameters or {}).get("binary_data_output", False))


def echoed_parameters(request: InferenceRequest) -> dict[str, Any] | None:
    """The request's parameters to echo in the response, without the binary extension's own."""
    if not request.parameters:
        return None
    kept = {k: v for k, v in request.parameters.items() if k not in BINARY_PARAMS}
    return kept or None
