"""The KServe v2 gRPC endpoint of one stage (`inference.GRPCInferenceService`), beside REST, on STAGE_GRPC_PORT.

The servicer only adapts gRPC to the same `dataplane.DataPlane` the REST routes call: a ModelInferRequest
becomes the binary-extension body REST would carry (JSON header, then the `raw_input_contents` in order; typed
`contents` become the same bytes), so decoding, the model's checks, admission, tracing and the hop to the next
stage are the very same code; the binary answer becomes `raw_output_contents`. Stage-to-stage stays REST.

Errors map to gRPC status codes: bad input INVALID_ARGUMENT (naming the tensor), too large RESOURCE_EXHAUSTED,
not ready or overloaded UNAVAILABLE, unknown model NOT_FOUND; the message is the one REST would give.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf.message import DecodeError

from model_export.manifest import DATATYPE_TO_NUMPY
from stage_service import kserve_grpc as pb
from stage_service import protocol
from stage_service.dataplane import DataPlane, InferCall
from stage_service.errors import (
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    StageError,
    UpstreamError,
    UpstreamTimeout,
)
from stage_service.limits import HEADER_ALLOWANCE, BodyBudget
from stage_service.settings import StageSettings

log = logging.getLogger("stage_service")
INFER_METHOD = f"/{pb.SERVICE}/ModelInfer"
TIMING_METADATA = "x-stage-timing"

STATUS_OF: dict[type[StageError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    UpstreamError: grpc.StatusCode.UNAVAILABLE,
    UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
}

# The typed `contents` field that carries each datatype (FP16 and BF16 travel only as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def status_of(exc: StageError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def answering_errors(method: Handler) -> Handler:
    """A StageError becomes its status code and message; anything else INTERNAL naming its type, logged; a
    message that did not parse (`Malformed`) INVALID_ARGUMENT."""

    @functools.wraps(method)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise InvalidInput(request.message)
            return await method(request, context)
        except StageError as exc:
            code, message = status_of(exc), exc.message
            if code == grpc.StatusCode.INTERNAL or isinstance(exc, UpstreamError):
                log.warning("%s: %s", type(exc).__name__, message)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            log.exception("unexpected error in gRPC %s", method.__name__, exc_info=exc)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
        # Aborted outside the handlers above and without the request: an abort raised inside one chains the
        # caught error, whose traceback holds the handler's frames and so the request's tensors, into the
        # AbortError grpc keeps in a reference cycle: each refused request's bytes stayed until the garbage
        # collector ran (+170 MB per refused 57 MB request, found by a hostile trial).
        del request
        await context.abort(code, message)

    return wrapped


class Malformed:
    """What the request deserializer gives for bytes that are not the method's message: the handler answers
    INVALID_ARGUMENT instead of grpc's UNKNOWN and a logged traceback."""

    def __init__(self, message: str) -> None:
        self.message = message


def parsing(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Malformed(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc}); "
                             "expected the KServe v2 protobuf message of this method")
    return parse


# ------------------------------------------------------------------------------------ parameters


def parameter_value(param: Any) -> bool | int | float | str | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def parameters_dict(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, p in params.items() if (v := parameter_value(p)) is not None}


def set_parameters(target: Any, params: Mapping[str, Any]) -> None:
    """JSON parameters into a protobuf parameters map: bool, int, float and str as such (an int past int64 as
    uint64), anything else as JSON text."""
    for key, value in params.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int) and -2**63 <= value < 2**63:
            slot.int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            slot.uint64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            slot.string_param = orjson.dumps(value).decode()


# ---------------------------------------------------------------------------- request and answer


def rest_body(request: Any, raw: list[bytes]) -> tuple[bytes, list[bytes]]:
    """The binary-extension request for a ModelInferRequest whose `raw_input_contents` are `raw` (read once:
    each read of the field copies every tensor): its JSON header, and its tensors' bytes apart, in order (the
    data plane reads them where they lie: `InferCall.sections`); every output binary. Typed contents travel as
    binary too (`typed_values`), so they meet the same checks as raw bytes."""
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents holds {len(raw)} tensors but the request has {len(request.inputs)} "
                           "inputs; expected one raw_input_contents entry per input, in order")
    sections = raw or [typed_values(tensor).tobytes() for tensor in request.inputs]
    inputs = [input_header(tensor, sections[i], typed=not raw) for i, tensor in enumerate(request.inputs)]
    header: dict[str, Any] = {"inputs": inputs,
                              "parameters": {**parameters_dict(request.parameters), "binary_data_output": True}}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    return orjson.dumps(header), sections


def input_header(tensor: Any, section: bytes, typed: bool) -> dict[str, Any]:
    """One input as the JSON header lists it, its bytes (raw, or its typed contents as bytes) following."""
    entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                             "parameters": {"binary_data_size": len(section)}}
    if not typed:
        if tensor.HasField("contents"):
            raise InvalidInput(f"tensor {tensor.name}: has both contents and raw_input_contents; send one")
        _check_raw_size(entry, len(section))
    return entry


def typed_values(tensor: Any) -> np.ndarray:
    """A typed-contents input's values as an array of its datatype, checked in the gRPC client's terms: the
    contents field its datatype takes, as many values as its shape holds, each in the datatype's range."""
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(f"tensor {name}: datatype {datatype!r} is not one a stage takes; expected one of "
                           f"{sorted(DATATYPE_TO_NUMPY)}")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"tensor {name}: {datatype} has no typed contents field; send it in raw_input_contents")
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if given and given != [field]:
        raise InvalidInput(f"tensor {name}: {datatype} values go in contents.{field}; got "
                           f"{', '.join(f'contents.{g}' for g in given)}")
    values = getattr(tensor.contents, field)
    needed = math.prod(shape) if all(d >= 0 for d in shape) else None
    if not given and not needed:
        return np.empty(0, DATATYPE_TO_NUMPY[datatype])  # nothing to check here: the shape is the data plane's
    if needed is not None and len(values) != needed:
        raise InvalidInput(f"tensor {name}: contents.{field} holds {len(values)} values but shape {shape} needs "
                           f"{needed}" + ("" if given else f"; send its values in contents.{field} or "
                                                          "raw_input_contents"))
    dtype = np.dtype(DATATYPE_TO_NUMPY[datatype])
    if dtype.kind not in "iu":
        return np.array(values, dtype=dtype)
    wide = np.array(values, dtype=np.uint64 if dtype == np.uint64 else np.int64)
    info = np.iinfo(dtype)
    if wide.size and (int(wide.min()) < info.min or int(wide.max()) > info.max):
        raise InvalidInput(f"tensor {name}: contents.{field} holds values outside {datatype}'s range "
                           f"[{info.min}, {info.max}]")
    return wide.astype(dtype)


def _check_raw_size(entry: dict[str, Any], size: int) -> None:
    """A raw tensor's bytes against its shape and datatype, in the gRPC client's own terms (REST's message would
    name `binary_data_size`, which a gRPC client never set); anything else odd is left to the data plane."""
    shape, numpy_name = entry["shape"], DATATYPE_TO_NUMPY.get(entry["datatype"])
    if numpy_name is None or any(d < 0 for d in shape):
        return
    expected = math.prod(shape) * np.dtype(numpy_name).itemsize
    if size != expected:
        raise InvalidInput(f"tensor {entry['name']}: raw_input_contents holds {size} bytes but shape {shape} of "
                           f"{entry['datatype']} needs {expected}")


def infer_response(content: bytes, header_length: int | None) -> Any:
    """The ModelInferResponse for the data plane's binary answer: the header's outputs, their bytes raw."""
    if header_length is None:  # every output is asked for binary; a JSON answer means a fault here
        raise InferenceFailed("the data plane answered without binary outputs")
    header = orjson.loads(content[:header_length])
    response = pb.ModelInferResponse(model_name=header["model_name"], model_version=header.get("model_version", ""),
                                     id=header.get("id", ""))
    set_parameters(response.parameters, header.get("parameters") or {})
    view, offset = memoryview(content), header_length
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        response.raw_output_contents.append(bytes(view[offset:offset + size]))
        offset += size
    return response


def text_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as headers (trace context, x-request-id), binary `-bin` entries left out."""
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def tensor_metadata(tensors: list[protocol.MetadataTensor]) -> list[Any]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in tensors]


# ------------------------------------------------------------------------------------- servicer


class InferenceServicer:
    """ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer on one data plane."""

    def __init__(self, plane: DataPlane, budget: BodyBudget, max_request_bytes: int) -> None:
        self.plane = plane
        self.budget = budget
        self.max_request_bytes = max_request_bytes

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.plane.resolve(request.name, request.version or None, text_metadata(context))
        return pb.ModelReadyResponse(ready=self.plane.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        meta = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        meta = self.plane.model_metadata(request.name, request.version or None, text_metadata(context))
        return pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform,
                                        inputs=tensor_metadata(meta.inputs), outputs=tensor_metadata(meta.outputs))

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        raw = list(request.raw_input_contents)
        raw_bytes = sum(len(r) for r in raw)
        if raw_bytes > self.max_request_bytes:
            raise PayloadTooLarge(f"the request's raw_input_contents hold {raw_bytes} bytes, over the limit of "
                                  f"{self.max_request_bytes} (STAGE_MAX_REQUEST_BYTES)")
        with self.budget.account() as take:
            # What the message holds: its raw tensors and a header's worth (ByteSize() serializes the whole
            # message again to count it: 0.6 ms and more a request for 3.2 MB); typed contents only by ByteSize.
            take(raw_bytes + HEADER_ALLOWANCE if raw else request.ByteSize())
            head, sections = rest_body(request, raw)
            call = InferCall(model=request.model_name, version=request.model_version or None, body=head,
                             header_length=str(len(head)), headers=text_metadata(context),
                             route=INFER_METHOD, path=INFER_METHOD, sees_arrivals=False, sections=sections)
            answer = await self.plane.infer(call)
        context.set_trailing_metadata(((TIMING_METADATA, answer.timing),))
        response = infer_response(answer.content, answer.header_length)
        # The request's own parameters as sent: through the data plane's JSON a NaN double became null and a
        # small uint64 an int64.
        for key, value in request.parameters.items():
            if key in response.parameters:
                response.parameters[key].CopyFrom(value)
        return response


MESSAGES = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The six methods as unary handlers (the proto's repository methods answer UNIMPLEMENTED)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(answering_errors(getattr(servicer, name)),
                                                  request_deserializer=parsing(req),
                                                  response_serializer=resp.SerializeToString)
        for name, (req, resp) in MESSAGES.items()
    }
    return grpc.method_handlers_generic_handler(pb.SERVICE, handlers)


def grpc_address(settings: StageSettings) -> tuple[str, str]:
    """Where gRPC listens, as grpc writes it (`unix:/path` or `host:port`), and the setting that chose it."""
    if settings.grpc_uds is not None:
        return f"unix:{settings.grpc_uds}", "STAGE_GRPC_UDS"
    host = settings.host
    return (f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"), "STAGE_GRPC_PORT"


async def start_server(where: tuple[str, str], servicer: InferenceServicer) -> grpc.aio.Server:
    """A started grpc.aio server on the running loop at `where` (`grpc_address`); RuntimeError naming the setting
    if it cannot listen."""
    address, setting = where
    # Messages a little over STAGE_MAX_REQUEST_BYTES (protobuf framing, names, shapes) reach ModelInfer, which
    # refuses too many tensor bytes by name; grpc refuses larger ones itself with RESOURCE_EXHAUSTED.
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", servicer.max_request_bytes + HEADER_ALLOWANCE),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers((service_handler(servicer),))
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"{setting}: cannot listen on {address} ({exc})") from None
    await server.start()
    log.info("KServe v2 gRPC on %s", address)
    return server

