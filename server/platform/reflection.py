"""Server reflection, with each field's JSON name, so tools print canonical proto3 JSON."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2


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


def reflection_pool(files: Sequence[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool holding the files and everything they import, json_name included."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.Add(_with_json_names(file))
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def enable_reflection(
    server: grpc.aio.Server, service_names: Sequence[str], files: Sequence[FileDescriptor]
) -> None:
    """Serves grpc.reflection.v1alpha for the services, which the files define."""
    pool = reflection_pool([*files, reflection_pb2.DESCRIPTOR])
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server, pool)
