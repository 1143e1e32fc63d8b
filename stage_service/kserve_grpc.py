"""The KServe v2 gRPC protocol's messages (`inference.GRPCInferenceService`), without generated code.

`SERIALIZED_PROTO` is KServe's `grpc_predict_v2.proto` compiled by protoc, taken byte for byte from the
generated module of the `kserve` wheel 0.21.0 (`kserve/protocol/grpc/grpc_predict_v2_pb2.py`, Apache-2.0,
Copyright 2023 The KServe Authors). Triton's `grpc_service.proto` (what `tritonclient.grpc` speaks) has the
same package, services and field numbers for everything here, and two more choices of InferParameter, added
here (`_with_tritons_parameter_choices`); tests/stage_service/test_grpc.py checks that field by field.

The messages live in a pool of their own, not protobuf's default one: a process that also imports
tritonclient's or KServe's generated modules (tests, benchmarks) would otherwise register the same message
names twice and fail.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"

SERIALIZED_PROTO = (
    b'\n\x15grpc_predict_v2.proto\x12\tinference"\x13\n\x11ServerLiveRequest""\n\x12ServerLiveResponse\x12\x0c'
    b'\n\x04live\x18\x01 \x01(\x08"\x14\n\x12ServerReadyRequest"$\n\x13ServerReadyResponse\x12\r\n\x05ready\x18'
    b'\x01 \x01(\x08"2\n\x11ModelReadyRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 '
    b'\x01(\t"#\n\x12ModelReadyResponse\x12\r\n\x05ready\x18\x01 \x01(\x08"\x17\n\x15ServerMetadataRequest"K\n'
    b'\x16ServerMetadataResponse\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t\x12\x12'
    b'\n\nextensions\x18\x03 \x03(\t"5\n\x14ModelMetadataRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n'
    b'\x07version\x18\x02 \x01(\t"\x8d\x02\n\x15ModelMetadataResponse\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10'
    b'\n\x08versions\x18\x02 \x03(\t\x12\x10\n\x08platform\x18\x03 \x01(\t\x12?\n\x06inputs\x18\x04 \x03(\x0b2/'
    b'.inference.ModelMetadataResponse.TensorMetadata\x12@\n\x07outputs\x18\x05 \x03(\x0b2/.inference.ModelMeta'
    b'dataResponse.TensorMetadata\x1a?\n\x0eTensorMetadata\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08datat'
    b'ype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03"\xee\x06\n\x11ModelInferRequest\x12\x12\n\nmodel_n'
    b'ame\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\t\x12\n\n\x02id\x18\x03 \x01(\t\x12@\n\nparame'
    b'ters\x18\x04 \x03(\x0b2,.inference.ModelInferRequest.ParametersEntry\x12=\n\x06inputs\x18\x05 \x03(\x0b2-'
    b'.inference.ModelInferRequest.InferInputTensor\x12H\n\x07outputs\x18\x06 \x03(\x0b27.inference.ModelInferR'
    b'equest.InferRequestedOutputTensor\x12\x1a\n\x12raw_input_contents\x18\x07 \x03(\x0c\x1a\x94\x02\n\x10Infe'
    b'rInputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18'
    b'\x03 \x03(\x03\x12Q\n\nparameters\x18\x04 \x03(\x0b2=.inference.ModelInferRequest.InferInputTensor.Parame'
    b'tersEntry\x120\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContents\x1aL\n\x0fParametersEnt'
    b'ry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter:\x028'
    b'\x01\x1a\xd5\x01\n\x1aInferRequestedOutputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12[\n\nparameters\x18'
    b'\x02 \x03(\x0b2G.inference.ModelInferRequest.InferRequestedOutputTensor.ParametersEntry\x1aL\n\x0fParamet'
    b'ersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter'
    b':\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2'
    b'\x19.inference.InferParameter:\x028\x01"\xd5\x04\n\x12ModelInferResponse\x12\x12\n\nmodel_name\x18\x01 '
    b'\x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\t\x12\n\n\x02id\x18\x03 \x01(\t\x12A\n\nparameters\x18\x04'
    b' \x03(\x0b2-.inference.ModelInferResponse.ParametersEntry\x12@\n\x07outputs\x18\x05 \x03(\x0b2/.inference'
    b'.ModelInferResponse.InferOutputTensor\x12\x1b\n\x13raw_output_contents\x18\x06 \x03(\x0c\x1a\x97\x02\n'
    b'\x11InferOutputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05'
    b'shape\x18\x03 \x03(\x03\x12S\n\nparameters\x18\x04 \x03(\x0b2?.inference.ModelInferResponse.InferOutputTe'
    b'nsor.ParametersEntry\x120\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContents\x1aL\n\x0fPa'
    b'rametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferPara'
    b'meter:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01('
    b'\x0b2\x19.inference.InferParameter:\x028\x01"i\n\x0eInferParameter\x12\x14\n\nbool_param\x18\x01 \x01('
    b'\x08H\x00\x12\x15\n\x0bint64_param\x18\x02 \x01(\x03H\x00\x12\x16\n\x0cstring_param\x18\x03 \x01(\tH\x00B'
    b'\x12\n\x10parameter_choice"\xd0\x01\n\x13InferTensorContents\x12\x15\n\rbool_contents\x18\x01 \x03(\x08'
    b'\x12\x14\n\x0cint_contents\x18\x02 \x03(\x05\x12\x16\n\x0eint64_contents\x18\x03 \x03(\x03\x12\x15\n\ruin'
    b't_contents\x18\x04 \x03(\r\x12\x17\n\x0fuint64_contents\x18\x05 \x03(\x04\x12\x15\n\rfp32_contents\x18'
    b'\x06 \x03(\x02\x12\x15\n\rfp64_contents\x18\x07 \x03(\x01\x12\x16\n\x0ebytes_contents\x18\x08 \x03(\x0c"0'
    b'\n\x1aRepositoryModelLoadRequest\x12\x12\n\nmodel_name\x18\x01 \x01(\t"C\n\x1bRepositoryModelLoadResponse'
    b'\x12\x12\n\nmodel_name\x18\x01 \x01(\t\x12\x10\n\x08isLoaded\x18\x02 \x01(\x08"2\n\x1cRepositoryModelUnlo'
    b'adRequest\x12\x12\n\nmodel_name\x18\x01 \x01(\t"G\n\x1dRepositoryModelUnloadResponse\x12\x12\n\nmodel_nam'
    b'e\x18\x01 \x01(\t\x12\x12\n\nisUnloaded\x18\x02 \x01(\x082\xd2\x05\n\x14GRPCInferenceService\x12K\n\nServ'
    b'erLive\x12\x1c.inference.ServerLiveRequest\x1a\x1d.inference.ServerLiveResponse"\x00\x12N\n\x0bServerRead'
    b'y\x12\x1d.inference.ServerReadyRequest\x1a\x1e.inference.ServerReadyResponse"\x00\x12K\n\nModelReady\x12'
    b'\x1c.inference.ModelReadyRequest\x1a\x1d.inference.ModelReadyResponse"\x00\x12W\n\x0eServerMetadata\x12 .'
    b'inference.ServerMetadataRequest\x1a!.inference.ServerMetadataResponse"\x00\x12T\n\rModelMetadata\x12\x1f.'
    b'inference.ModelMetadataRequest\x1a .inference.ModelMetadataResponse"\x00\x12K\n\nModelInfer\x12\x1c.infer'
    b'ence.ModelInferRequest\x1a\x1d.inference.ModelInferResponse"\x00\x12f\n\x13RepositoryModelLoad\x12%.infer'
    b'ence.RepositoryModelLoadRequest\x1a&.inference.RepositoryModelLoadResponse"\x00\x12l\n\x15RepositoryModel'
    b'Unload\x12\'.inference.RepositoryModelUnloadRequest\x1a(.inference.RepositoryModelUnloadResponse"\x00b'
    b'\x06proto3'
)



def _with_tritons_parameter_choices(serialized: bytes) -> descriptor_pb2.FileDescriptorProto:
    """KServe's file with InferParameter's two further choices in Triton's proto, double_param (4) and
    uint64_param (5): without them a float or uint64 parameter from tritonclient was dropped unseen."""
    file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    parameter = next(m for m in file.message_type if m.name == "InferParameter")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (("double_param", 4, field.TYPE_DOUBLE), ("uint64_param", 5, field.TYPE_UINT64)):
        if all(f.number != number for f in parameter.field):
            parameter.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL, oneof_index=0,
                                json_name=name.replace("_p", "P"))
    return file


POOL = descriptor_pool.DescriptorPool()
FILE = POOL.Add(_with_tritons_parameter_choices(SERIALIZED_PROTO))


def message(name: str) -> Any:
    """The message class of `inference.<name>`."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = message("ServerLiveRequest")
ServerLiveResponse = message("ServerLiveResponse")
ServerReadyRequest = message("ServerReadyRequest")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyRequest = message("ModelReadyRequest")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataRequest = message("ServerMetadataRequest")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataRequest = message("ModelMetadataRequest")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
InferParameter = message("InferParameter")
