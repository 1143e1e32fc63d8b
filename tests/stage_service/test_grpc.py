"""The KServe v2 gRPC endpoint (STAGE_GRPC_PORT): tritonclient.grpc, unchanged, against real stage processes.

A chain tiny-stage-0 (gRPC and REST) -> tiny-stage-1 -> tiny-stage-2 (REST between stages), and a one-stage
pipeline of identities carrying six inputs and six outputs of six datatypes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor as pb_descriptor
from onnx import helper
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from model_export.manifest import Manifest
from model_export.pipeline_writer import write_pipeline
from stage_service import kserve_grpc
from stage_service.chain import propagated_headers
from stage_service.settings import GATEWAY_HEADER
from tests.stage_service.conftest import MAX_REQUEST_BYTES
from tests.stage_service.procs import HOST, StageProcess, free_port, start_stage, stop_all
from tests.stage_service.test_datatypes import ARRAYS, ONNX_TYPES
from tests.tiny import IR_VERSION, OPSET

RNG = np.random.default_rng(11)
DATATYPE = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "bool": "BOOL"}


class GrpcStage:
    def __init__(self, process: StageProcess, grpc_port: int) -> None:
        self.process = process
        self.address = f"{HOST}:{grpc_port}"

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.address)


def start_grpc_stage(manifest: Path, name: str, log_dir: Path, next_url: str | None = None,
                     **env: str) -> GrpcStage:
    grpc_port = free_port()
    process = start_stage(manifest, name, next_url=next_url, log_dir=log_dir,
                          env={"STAGE_GRPC_PORT": str(grpc_port), **env})
    return GrpcStage(process, grpc_port)


@pytest.fixture(scope="module")
def grpc_chain(tiny_pipeline: tuple[Path, Manifest],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcStage]:
    """The tiny chain, its first stage with gRPC on; yields the first stage."""
    directory, _ = tiny_pipeline
    manifest, logs = directory / "pipeline.json", tmp_path_factory.mktemp("grpc-chain")
    limit = {"STAGE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    last = start_stage(manifest, "tiny-stage-2", log_dir=logs, env=limit)
    middle = start_stage(manifest, "tiny-stage-1", next_url=last.url, log_dir=logs, env=limit)
    first = start_grpc_stage(manifest, "tiny-stage-0", logs, next_url=middle.url, **limit)
    yield first
    codes = stop_all([first.process, middle, last])
    assert codes == [0, 0, 0], "\n".join(s.log() for s in (first.process, middle, last))


@pytest.fixture(scope="module")
def identity_grpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcStage]:
    """A one-stage pipeline `types` whose outputs `<name>_out` are its inputs, for six datatypes."""
    directory = tmp_path_factory.mktemp("grpc-types")
    types = {n: ONNX_TYPES[DATATYPE[a.dtype.name]] for n, a in ARRAYS.items()}
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ARRAYS], "types",
        [helper.make_tensor_value_info(n, t, ["batch", 3]) for n, t in types.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, ["batch", 3]) for n, t in types.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.save(model, directory / "model.onnx")
    write_pipeline(directory, "types", [model], directory / "model.onnx")
    stage = start_grpc_stage(directory / "pipeline.json", "types-stage-0", directory)
    yield stage
    assert stage.process.stop() == 0, stage.process.log()


def inputs_of(arrays: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), DATATYPE[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def refused(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# ----------------------------------------------------------------------------------------- the proto


def fields_of(message: pb_descriptor.Descriptor) -> dict[str, Any]:
    """Every field by number: name, type, label, and the fields of a message-typed field, recursively."""
    return {f.number: (f.name, f.type, f.is_repeated,
                       fields_of(f.message_type) if f.message_type is not None else None)
            for f in message.fields}


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                    "ModelInfer"])
def test_messages_match_tritons_proto(method: str) -> None:
    """What tritonclient sends parses here field for field, and what this answers parses there (Triton's
    InferParameter has two choices more than KServe's, double and uint64: kserve_grpc adds them)."""
    ours = kserve_grpc.POOL.FindServiceByName(kserve_grpc.SERVICE).FindMethodByName(method)
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[method]
    for mine, other in ((ours.input_type, theirs.input_type), (ours.output_type, theirs.output_type)):
        assert mine.full_name == other.full_name
        if method != "ModelInfer":
            assert fields_of(mine) == fields_of(other)
    parameter = kserve_grpc.InferParameter.DESCRIPTOR
    triton_parameter = triton_pb2.InferParameter.DESCRIPTOR
    assert fields_of(parameter) == fields_of(triton_parameter)


def test_infer_messages_match_tritons_proto() -> None:
    for name in ("ModelInferRequest", "ModelInferResponse"):
        ours = kserve_grpc.POOL.FindMessageTypeByName(f"inference.{name}")
        theirs = triton_pb2.DESCRIPTOR.message_types_by_name[name]
        assert fields_of(ours) == fields_of(theirs)


# --------------------------------------------------------------------------------------- the chain


def test_tritonclient_grpc_unchanged(grpc_chain: GrpcStage, reference: Callable[..., np.ndarray]) -> None:
    client = grpc_chain.client()
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        assert client.is_model_ready("tiny", "v1")
        server = client.get_server_metadata()
        assert server.name == "meshpipe-stage-service" and "binary_tensor_data" in server.extensions
        meta = client.get_model_metadata("tiny")
        assert (meta.name, list(meta.versions), meta.platform) == ("tiny", ["v1"], "onnxruntime_onnx")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 16])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 4])]
        x = RNG.standard_normal((4, 16)).astype(np.float32)
        result = client.infer("tiny", inputs_of({"x": x}), outputs=[triton.InferRequestedOutput("y")],
                              request_id="req-9", headers={"x-request-id": "grpc-1"})
        np.testing.assert_allclose(result.as_numpy("y"), reference(x), atol=1e-5, rtol=0)
        response = result.get_response()
        assert (response.id, response.model_name, response.model_version) == ("req-9", "tiny", "v1")
        # No outputs named: all of them; a version named: that version.
        result = client.infer("tiny", inputs_of({"x": x}), model_version="v1")
        np.testing.assert_allclose(result.as_numpy("y"), reference(x), atol=1e-5, rtol=0)
    finally:
        client.close()


def test_bad_input_codes_name_what_was_wrong(grpc_chain: GrpcStage) -> None:
    client = grpc_chain.client()
    try:
        cases: list[tuple[Callable[[], Any], str, list[str]]] = [
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((2, 15), np.float32)})),
             "INVALID_ARGUMENT", ["x", "16"]),
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((2, 16), np.int32)})),
             "INVALID_ARGUMENT", ["x", "FP32"]),
            (lambda: client.infer("tiny", inputs_of({"z": np.zeros((2, 16), np.float32)})),
             "INVALID_ARGUMENT", ["z", "x"]),
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((2, 16), np.float32)}),
                                  outputs=[triton.InferRequestedOutput("nope")]),
             "INVALID_ARGUMENT", ["nope", "y"]),
            (lambda: client.infer("other", inputs_of({"x": np.zeros((2, 16), np.float32)})),
             "NOT_FOUND", ["other", "tiny"]),
            (lambda: client.get_model_metadata("tiny", "v9"), "NOT_FOUND", ["v9", "v1"]),
            # over STAGE_MAX_REQUEST_BYTES: refused by name before any work
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((1050, 16), np.float32)})),
             "RESOURCE_EXHAUSTED", ["STAGE_MAX_REQUEST_BYTES"]),
            # far over it: grpc itself refuses the message
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((4096, 16), np.float32)})),
             "RESOURCE_EXHAUSTED", []),
            # within it, but the activations of a later stage would not be
            (lambda: client.infer("tiny", inputs_of({"x": np.zeros((900, 16), np.float32)})),
             "RESOURCE_EXHAUSTED", ["samples"]),
        ]
        for call, code, words in cases:
            error = refused(call)
            assert error.status() == f"StatusCode.{code}", error
            message = error.message() or ""
            assert all(w in message for w in words), message
            assert "Traceback" not in message
        assert client.is_server_ready()  # none of it hurt the stage
    finally:
        client.close()


def test_raw_contents_must_match_the_inputs(grpc_chain: GrpcStage) -> None:
    """Requests tritonclient would never build, sent with the proto's own stub: the count and sizes of raw
    contents, and typed contents."""
    import grpc

    channel = grpc.insecure_channel(grpc_chain.address)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=kserve_grpc.ModelInferRequest.SerializeToString,
                                response_deserializer=kserve_grpc.ModelInferResponse.FromString)
    try:
        request = kserve_grpc.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        request.raw_input_contents.extend([np.zeros(16, np.float32).tobytes()] * 2)
        with pytest.raises(grpc.RpcError) as info:
            infer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
        del request.raw_input_contents[1]
        request.raw_input_contents[0] = b"\0" * 60
        with pytest.raises(grpc.RpcError) as info:
            infer(request)
        # in the gRPC client's terms: REST's `binary_data_size` is nothing it ever set
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == ("tensor x: raw_input_contents holds 60 bytes but shape [1, 16] of FP32 "
                                        "needs 64")
        # typed contents (no raw) are served too
        x = RNG.standard_normal((1, 16)).astype(np.float32)
        typed = kserve_grpc.ModelInferRequest(model_name="tiny")
        typed.inputs.add(name="x", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(x.ravel().tolist())
        response = infer(typed)
        assert [o.name for o in response.outputs] == ["y"] and len(response.raw_output_contents[0]) == 16
    finally:
        channel.close()


def _stub(stage: GrpcStage) -> tuple[Any, Callable[[Any], Any]]:
    import grpc

    channel = grpc.insecure_channel(stage.address, options=[("grpc.max_send_message_length", -1)])
    return channel, channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=kserve_grpc.ModelInferRequest.SerializeToString,
                                        response_deserializer=kserve_grpc.ModelInferResponse.FromString)


def _typed(build: Callable[[Any], None], datatype: str = "FP32") -> Any:
    request = kserve_grpc.ModelInferRequest(model_name="tiny")
    build(request.inputs.add(name="x", datatype=datatype, shape=[1, 16]))
    return request


def test_typed_contents_are_the_same_tensors_as_raw_and_refused_in_their_own_terms(grpc_chain: GrpcStage) -> None:
    import grpc

    channel, infer = _stub(grpc_chain)
    try:
        x = RNG.standard_normal((1, 16)).astype(np.float32)
        x[0, :2] = [np.nan, np.inf]  # raw bytes carry them, so typed contents do too
        raw = kserve_grpc.ModelInferRequest(model_name="tiny")
        raw.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        raw.raw_input_contents.append(x.tobytes())
        typed = infer(_typed(lambda t: t.contents.fp32_contents.extend(x.ravel().tolist())))
        assert typed.raw_output_contents[0] == infer(raw).raw_output_contents[0]
        cases: list[tuple[Any, str]] = [
            (_typed(lambda t: None), "tensor x: contents.fp32_contents holds 0 values but shape [1, 16] needs 16; "
                                     "send its values in contents.fp32_contents or raw_input_contents"),
            (_typed(lambda t: t.contents.fp64_contents.extend([0.0] * 16)),
             "tensor x: FP32 values go in contents.fp32_contents; got contents.fp64_contents"),
            (_typed(lambda t: t.contents.fp32_contents.extend([0.0] * 10)),
             "tensor x: contents.fp32_contents holds 10 values but shape [1, 16] needs 16"),
            (_typed(lambda t: t.contents.int_contents.extend([300] + [0] * 15), "INT8"),
             "tensor x: contents.int_contents holds values outside INT8's range [-128, 127]"),
            (_typed(lambda t: t.contents.bytes_contents.append(b"a"), "BYTES"),
             "tensor x: datatype 'BYTES' is not one a stage takes; expected one of ['BOOL', 'FP16', 'FP32', "
             "'FP64', 'INT16', 'INT32', 'INT64', 'INT8', 'UINT16', 'UINT32', 'UINT64', 'UINT8']"),
            (_typed(lambda t: None, "FP16"), "tensor x: FP16 has no typed contents field; send it in "
                                             "raw_input_contents"),
        ]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                infer(request)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    finally:
        channel.close()


def test_bytes_that_are_not_the_message_are_invalid_argument(grpc_chain: GrpcStage) -> None:
    import grpc

    channel = grpc.insecure_channel(grpc_chain.address)
    try:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff\xff\x0f")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("the request is not a valid inference.ModelInferRequest message")
    finally:
        channel.close()
    assert "Traceback" not in grpc_chain.process.log()


def test_float_and_uint64_parameters_come_back(grpc_chain: GrpcStage) -> None:
    client = grpc_chain.client()
    try:
        result = client.infer("tiny", inputs_of({"x": np.zeros((1, 16), np.float32)}),
                              parameters={"ratio": 0.25, "flag": True, "name": "n", "count": 3})
        echoed = result.get_response().parameters
        assert {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in echoed.items()} == \
            {"ratio": 0.25, "flag": True, "name": "n", "count": 3}
    finally:
        client.close()


def test_parameters_come_back_as_sent(grpc_chain: GrpcStage) -> None:
    """A NaN double and a small uint64 keep their type and value (the data plane's JSON would make them null
    and an int64)."""
    channel, infer = _stub(grpc_chain)
    try:
        request = _typed(lambda t: t.contents.fp32_contents.extend([0.0] * 16))
        request.parameters["nan"].double_param = float("nan")
        request.parameters["small"].uint64_param = 5
        echoed = infer(request).parameters
        assert echoed["nan"].WhichOneof("parameter_choice") == "double_param" and np.isnan(echoed["nan"].double_param)
        assert echoed["small"].WhichOneof("parameter_choice") == "uint64_param" and echoed["small"].uint64_param == 5
    finally:
        channel.close()


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_refused_large_requests_do_not_keep_their_memory(identity_grpc: GrpcStage) -> None:
    """A refused request's tensors are freed with it, not left for the garbage collector: before, each refused
    40 MB request kept about three times that (the abort chained the error whose traceback held them)."""
    import grpc

    channel, infer = _stub(identity_grpc)
    request = kserve_grpc.ModelInferRequest(model_name="types")
    request.inputs.add(name="nope", datatype="FP32", shape=[40 << 18])
    request.raw_input_contents.append(bytes(40 << 20))
    try:
        with pytest.raises(grpc.RpcError):
            infer(request)  # the first: the process's buffers grow once
        before = _rss_mb(identity_grpc.process.pid)
        for _ in range(8):
            with pytest.raises(grpc.RpcError) as info:
                infer(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _rss_mb(identity_grpc.process.pid) - before < 200, "refused requests kept their memory"
    finally:
        channel.close()


# ------------------------------------------------------------------------------ several inputs/outputs


def test_six_inputs_and_outputs_of_six_datatypes(identity_grpc: GrpcStage) -> None:
    client = identity_grpc.client()
    try:
        result = client.infer("types", inputs_of(ARRAYS))
        for name, array in ARRAYS.items():
            got = result.as_numpy(f"{name}_out")
            assert got is not None and got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array)
        # a subset, in the order asked
        wanted = ["u8_out", "f16_out"]
        result = client.infer("types", inputs_of(ARRAYS), outputs=[triton.InferRequestedOutput(n) for n in wanted])
        assert [o.name for o in result.get_response().outputs] == wanted
        np.testing.assert_array_equal(result.as_numpy("u8_out"), ARRAYS["u8"])
    finally:
        client.close()


def test_through_the_gateway_the_first_stage_answers_only_for_the_pipeline(grpc_chain: GrpcStage) -> None:
    """The first stage's own name is internal. gRPC names the model inside the message, where the gateway's routes
    cannot see it, so the gateway marks every call it lets in (GATEWAY_HEADER) and such a call may name only the
    pipeline. A direct caller of the app, without the mark, still reaches the stage by its name."""
    client = grpc_chain.client()
    x = {"x": RNG.standard_normal((2, 16)).astype(np.float32)}
    marked = {GATEWAY_HEADER: "true"}
    try:
        assert client.is_model_ready("tiny-stage-0")
        assert client.get_model_metadata("tiny-stage-0").name == "tiny-stage-0"
        inside = client.infer("tiny-stage-0", inputs_of(x)).as_numpy("y")
        for call in (lambda: client.infer("tiny-stage-0", inputs_of(x), headers=marked),
                     lambda: client.get_model_metadata("tiny-stage-0", headers=marked),
                     lambda: client.is_model_ready("tiny-stage-0", headers=marked)):
            error = refused(call)
            assert error.status() == "StatusCode.NOT_FOUND", error
            assert error.message() == "model 'tiny-stage-0' is not served here; this process serves 'tiny'"
        np.testing.assert_array_equal(client.infer("tiny", inputs_of(x), headers=marked).as_numpy("y"), inside)
    finally:
        client.close()
    # the mark speaks of the hop into the first stage: it is not carried on, where x-pipeline-* headers are
    assert propagated_headers({"X-Pipeline-Gateway": "true", "x-pipeline-version": "s1", "x-request-id": "r"}) == {
        "x-pipeline-version": "s1", "x-request-id": "r"}
    rest = httpx.get(f"{grpc_chain.process.url}/v2/models/tiny-stage-0", headers=marked)
    assert rest.status_code == 404 and "serves 'tiny'" in rest.json()["error"]
    assert httpx.get(f"{grpc_chain.process.url}/v2/models/tiny", headers=marked).status_code == 200


# --------------------------------------------------------------------------------------- not ready


def test_draining_stage_answers_unavailable(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """On SIGTERM with a drain delay the stage is not ready: ServerReady false, ModelInfer UNAVAILABLE."""
    directory, _ = tiny_pipeline
    manifest = directory / "pipeline.json"
    last = start_stage(manifest, "tiny-stage-2", log_dir=tmp_path)
    middle = start_stage(manifest, "tiny-stage-1", next_url=last.url, log_dir=tmp_path)
    first = start_grpc_stage(manifest, "tiny-stage-0", tmp_path, next_url=middle.url, STAGE_DRAIN_DELAY_S="3")
    client = first.client()
    try:
        assert client.is_server_ready()
        first.process.send(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while client.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.is_server_ready() and not client.is_model_ready("tiny")
        assert client.is_server_live()
        error = refused(lambda: client.infer("tiny", inputs_of({"x": np.zeros((1, 16), np.float32)})))
        assert error.status() == "StatusCode.UNAVAILABLE" and "not ready" in (error.message() or "")
    finally:
        client.close()
        codes = stop_all([first.process, middle, last])
    assert codes == [0, 0, 0], first.process.log()
