"""Server reflection that tools can use: v1 and v1alpha, method symbols, documented descriptors.

grpcio-reflection serves only ``grpc.reflection.v1alpha`` (newer grpcurl and buf ask for ``v1``
first), cannot resolve a method symbol such as ``keystile.v1.KeyService.CreateKey`` (grpc/grpc#34743:
``grpcurl describe`` of a method fails with "Symbol not found"), and serves descriptors without
their comments. This servicer extends it: the same messages answer both versions (their wire
formats are identical), a method symbol resolves to its service's file, and keystile's own file is
served as ``make proto`` compiled it, comments included (``keystile/v1/descriptors.binpb``).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import _async, reflection_pb2

V1_SERVICE: Final = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE: Final = "grpc.reflection.v1alpha.ServerReflection"


def documented_files() -> dict[str, bytes]:
    """Keystile's FileDescriptorProtos with source info (comments), by file name."""
    data = (resources.files("keystile.v1") / "descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {proto.name: proto.SerializeToString() for proto in files}


class Reflection(_async.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer, with method symbols and documented descriptors."""

    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__([*service_names, V1_SERVICE, V1ALPHA_SERVICE])
        self._documented = documented_files()

    def _respond(self, descriptor: Any, request: Any) -> reflection_pb2.ServerReflectionResponse:
        seen: dict[str, Any] = {}
        pending = [descriptor]
        while pending:
            current = pending.pop()
            if current.name not in seen:
                seen[current.name] = current
                pending.extend(current.dependencies)
        protos = []
        for name, file in seen.items():
            documented = self._documented.get(name)
            if documented is None:
                proto = descriptor_pb2.FileDescriptorProto()
                file.CopyToProto(proto)
                documented = proto.SerializeToString()
            protos.append(documented)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=protos),
            original_request=request,
        )

    def _not_found(self, request: Any) -> reflection_pb2.ServerReflectionResponse:
        return reflection_pb2.ServerReflectionResponse(
            error_response=reflection_pb2.ErrorResponse(
                error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message="not found"
            ),
            original_request=request,
        )

    def _file_by_filename(self, request: Any, filename: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            return self._respond(self._pool.FindFileByName(filename), request)
        except KeyError:
            return self._not_found(request)

    def _file_containing_symbol(self, request: Any, name: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            return self._respond(self._pool.FindFileContainingSymbol(name), request)
        except KeyError:
            pass
        # A method: its service's file (the pool indexes services, not their methods).
        service, _, method = name.rpartition(".")
        try:
            found = self._pool.FindServiceByName(service)
        except KeyError:
            return self._not_found(request)
        if method not in found.methods_by_name:
            return self._not_found(request)
        return self._respond(found.file, request)


def add_to_server(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (and themselves)."""
    servicer = Reflection(service_names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (V1_SERVICE, V1ALPHA_SERVICE):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method}),)
        )
