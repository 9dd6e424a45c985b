"""Server reflection, v1 and v1alpha, serving descriptors with their comments and JSON names."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
# Both protocols: grpcurl from 1.8.8, Postman 11 and buf curl ask v1 first,
# older clients (grpcurl 1.8.6, which `make install` brings) only know v1alpha.
SERVICE_NAMES = (V1, V1ALPHA)
_METHOD = "ServerReflectionInfo"
_V1_FILE = "grpc/reflection/v1/reflection.proto"

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def _with_json_names(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)

    def fill(
        messages: Iterable[descriptor_pb2.DescriptorProto], owner: dict[str, Descriptor]
    ) -> None:
        for message in messages:
            descriptor = owner[message.name]
            for field in message.field:
                field.json_name = descriptor.fields_by_name[field.name].json_name
            fill(message.nested_type, dict(descriptor.nested_types_by_name))

    fill(proto.message_type, dict(file.message_types_by_name))
    return proto


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, made from v1alpha's by renaming its package.

    No installed package ships v1's descriptor (grpcio-reflection has only
    v1alpha); its messages are v1alpha's, field for field, so v1 is served by
    the same code with the same (de)serializers, and described by this copy.
    """
    proto = _with_json_names(reflection_pb2.DESCRIPTOR)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, new.strip(".")

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old) if type_name.startswith(old) else type_name

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.HasField("type_name"):
                    field.type_name = renamed(field.type_name)
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return proto


def served_files(
    documented: descriptor_pb2.FileDescriptorSet, files: Sequence[FileDescriptor]
) -> list[descriptor_pb2.FileDescriptorProto]:
    """What reflection serves, each file after the files it imports.

    A file in `documented` (protoc's output, with comments and json_name) is
    served as it is there; any other, among `files`, both reflection protocols'
    and everything they import, from its Python descriptor, with every
    json_name filled in: Python drops json_name from a FileDescriptorProto
    unless it was set explicitly, and grpcurl would then print `order_id`
    instead of proto3 JSON's `orderId`.
    """
    served = {file.name: file for file in documented.file}

    def add(file: FileDescriptor) -> None:
        if file.name in served:
            return
        for dependency in file.dependencies:
            add(dependency)
        served[file.name] = _with_json_names(file)

    for file in [*files, reflection_pb2.DESCRIPTOR]:
        add(file)
    served[_V1_FILE] = _v1_reflection_file()
    return list(served.values())


class ReflectionServicer:
    """ServerReflectionInfo for both protocols, from serialized files kept as they are.

    grpc_reflection's own servicer serializes files again from a descriptor
    pool, which drops their source info, so GUIs would show no comments.
    """

    def __init__(
        self, service_names: Iterable[str], files: Sequence[descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._service_names = sorted(service_names)
        self._pool = descriptor_pool.DescriptorPool()
        for file in files:
            self._pool.Add(file)
        self._serialized = {file.name: file.SerializeToString() for file in files}
        self._dependencies = {file.name: list(file.dependency) for file in files}

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Any) -> Any:
        """The response to one request; NOT_FOUND for a file or symbol not served."""
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                services = [reflection_pb2.ServiceResponse(name=n) for n in self._service_names]
                listed = reflection_pb2.ListServiceResponse(service=services)
                return Response(original_request=request, list_services_response=listed)
            if kind == "file_by_filename":
                return self._file(request, request.file_by_filename)
            if kind == "file_containing_symbol":
                return self._file(request, self._file_containing(request.file_containing_symbol))
            if kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(wanted.containing_type)
                extension = self._pool.FindExtensionByNumber(message, wanted.extension_number)
                symbol = extension.full_name
                return self._file(request, self._pool.FindFileContainingSymbol(symbol).name)
            if kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                found = reflection_pb2.ExtensionNumberResponse(
                    base_type_name=message.full_name, extension_number=numbers
                )
                return Response(original_request=request, all_extension_numbers_response=found)
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND)
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT)

    def _file_containing(self, symbol: str) -> str:
        """The file declaring `symbol`; KeyError if none does.

        The pool finds messages, enums, services and fields, not methods, which
        `grpcurl describe acme.orders.v1.OrderService.GetOrder` asks for.
        """
        try:
            return str(self._pool.FindFileContainingSymbol(symbol).name)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)  # KeyError: not a method
            if service.methods_by_name.get(method) is None:
                raise
            return str(service.file.name)

    def _file(self, request: Any, name: str) -> Any:
        """The file, then every file it imports, directly or not, each once."""
        names: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            if current not in names:
                names.append(current)
                pending.extend(self._dependencies[current])  # KeyError: not served
        found = reflection_pb2.FileDescriptorResponse(
            file_descriptor_proto=[self._serialized[n] for n in names]
        )
        return Response(original_request=request, file_descriptor_response=found)


def _error(request: Any, code: grpc.StatusCode) -> Any:
    number, message = code.value
    error = reflection_pb2.ErrorResponse(error_code=number, error_message=message)
    return Response(original_request=request, error_response=error)


def enable_reflection(
    server: grpc.aio.Server,
    service_names: Sequence[str],
    files: Sequence[FileDescriptor],
    documented: descriptor_pb2.FileDescriptorSet,
) -> None:
    """Serves grpc.reflection.v1 and v1alpha for the services, which the files define.

    `documented` holds files with their comments (protoc's --include_source_info),
    served instead of the Python descriptors of the same name.
    """
    servicer = ReflectionServicer([*service_names, *SERVICE_NAMES], served_files(documented, files))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=Request.FromString,
        response_serializer=Response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, {_METHOD: handler}) for name in SERVICE_NAMES]
    )
