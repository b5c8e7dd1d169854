"""Envoy external authorization: ``envoy.service.auth.v3.Authorization/Check`` on the gRPC port.

A thin surface: it reads the key, the route's ``keystile.scopes`` (comma-separated) and
``keystile.resource`` from the CheckRequest's ``context_extensions``, asks ``gateway.decide``
(the same verification, cache and limits as VerifyKey), and writes the answer as a
CheckResponse: OK with headers for the upstream, the credential removed and the key's facts as
dynamic metadata (namespace ``keystile``), or a denial with its status, headers and JSON body.
A database that cannot be reached, or a route whose scopes are invalid, is a gRPC error, so that
Envoy's ``failure_mode_allow`` and ``status_on_error`` decide (docs/GATEWAYS.md).
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from .errors import StoreUnavailable
from .gateway import MISSING_KEY, GatewayConfig, HttpAnswer, Routes, answer_for, find_key
from .handlers import KeyServiceHandlers
from .model import Verification
from .rpc_errors import abort_for
from .wire import authorization

SCOPES: Final = "keystile.scopes"
RESOURCE: Final = "keystile.resource"
METADATA_NAMESPACE: Final = "keystile"
SERVICE_NAME: Final = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
_MAX_ANSWERS: Final = 50_000
_DENIED_CODES: Final = {403: code_pb2.PERMISSION_DENIED, 429: code_pb2.RESOURCE_EXHAUSTED}


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def check_response(answer: HttpAnswer) -> bytes:
    """An HttpAnswer as Envoy's CheckResponse, serialized."""
    serialized: bytes = _check_response(answer).SerializeToString()
    return serialized


def _check_response(answer: HttpAnswer) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update({METADATA_NAMESPACE: answer.facts})
    if answer.allowed:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in answer.upstream_headers.items()],
                headers_to_remove=list(answer.remove_headers),
                response_headers_to_add=[_header(k, v) for k, v in answer.client_headers.items()],
            ),
            dynamic_metadata=metadata,
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_DENIED_CODES.get(answer.status, code_pb2.UNAUTHENTICATED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=answer.status),
            headers=[_header(k, v) for k, v in answer.client_headers.items()],
            body=answer.body.decode(),
        ),
        dynamic_metadata=metadata,
    )


class EnvoyAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The Authorization servicer, over the same domain service as KeyService."""

    def __init__(self, handlers: KeyServiceHandlers, config: GatewayConfig) -> None:
        self._handlers = handlers
        self._config = config
        self._routes = Routes()
        # Serialized answers by the identity of a reused verdict: (verdict, credential header, bytes).
        self._answers: dict[int, tuple[Verification, str, bytes]] = {}
        self._missing = check_response(MISSING_KEY)

    async def Check(  # noqa: N802  # the generated method's name
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bytes:
        """Allow or deny one HTTP request Envoy is about to route (a serialized CheckResponse).

        Kept as short as VerifyKey's cached path (it is measured against the same no-op): the
        route's requirements are split once (``Routes``), a cached key's verdict comes without
        suspending, and that verdict is the same object call after call (see Verification), so
        its serialized answer is memoized by that identity with the header the key came in.
        """
        try:
            service = self._handlers.service
            if service is None:
                raise StoreUnavailable()
            attributes = request.attributes
            http = attributes.request.http
            config = self._config
            query = (http.query or http.path.partition("?")[2]) if config.key_query else ""
            key, credential = find_key(http.headers, query, config)
            if not key:
                return self._missing
            extensions = attributes.context_extensions
            required = self._routes[(extensions.get(SCOPES, ""), extensions.get(RESOURCE, ""))]
            verdict = service.verifier.verify_cached(key.encode(), required)
            if verdict is None:
                authorized = authorization(context) if service.verify_auth_required else ""
                verdict = await service.verifier.verify_key(
                    key, required.scopes, required.resource, authorization=authorized
                )
            if not verdict.reused:
                return check_response(answer_for(verdict, config, credential))
            memo = self._answers.get(id(verdict))
            if memo is not None and memo[0] is verdict and memo[1] == credential:
                return memo[2]
            serialized = check_response(answer_for(verdict, config, credential))
            if len(self._answers) >= _MAX_ANSWERS:
                self._answers.clear()
            self._answers[id(verdict)] = (verdict, credential, serialized)
            return serialized
        except Exception as exc:  # abort_for maps every error, unknown ones to INTERNAL
            await abort_for("Check", exc, context)
            raise  # not reached: abort_for always aborts


def add_to_server(handlers: KeyServiceHandlers, server: grpc.aio.Server, config: GatewayConfig) -> None:
    """Serve Envoy's Authorization service beside KeyService (answers leave as memoized bytes)."""
    servicer = EnvoyAuthorization(handlers, config)
    method = grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=external_auth_pb2.CheckRequest.FromString
    )
    table = {"Check": method}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, table),))
    server.add_registered_method_handlers(SERVICE_NAME, table)  # type: ignore[attr-defined]
