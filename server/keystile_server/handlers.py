"""gRPC handlers: protobuf in, one domain call, protobuf out.

No rule lives here beyond reading the wire format (oneofs, well-known types); every decision is the
domain's, and every error leaves through ``rpc_errors``.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from google.protobuf.message import Message

from keystile._format import hash_key
from keystile.v1 import keys_pb2, keys_pb2_grpc

from .errors import InvalidArgument, StoreUnavailable
from .fast_hash import sha256
from .key_messages import key_to_proto, metadata_from_proto, timestamp_field
from .lifecycle_handlers import LifecycleHandlers
from .limit_handlers import (
    LimitHandlers,
    credits_from_proto,
    limit_specs,
    usage_bytes,
)
from .model import KeyRecord, Verification, VerifyResult
from .rpc_errors import abort_for, translate_errors
from .service import KeySpec, utc_now
from .verdicts import validated_cost
from .verification import RequestShape, Requirements, requirements
from .wire import authorization, duration, parse_request

_RESULTS = {result: keys_pb2.VerifyResult.Value(f"VERIFY_RESULT_{result.name}") for result in VerifyResult}


def key_only(request: bytes) -> bytes | None:
    """The key of a serialized VerifyKeyRequest that sets nothing else, read off the wire; else None.

    Most verifications name only a key. Such a request is exactly field 1's tag (0x0A), a
    one-byte length (a key under 128 bytes) and the key's UTF-8 bytes, so the key can be hashed
    as it arrived, without building a message: measured on the real server, parsing the
    request was a third of what a cache hit cost beyond a no-op call. Anything else (scopes, a
    resource, unknown fields, a longer key) is parsed in full.
    """
    if len(request) > 2 and request[0] == 0x0A and request[1] < 0x80 and request[1] == len(request) - 2:
        return request[2:]
    return None


_MAX_MEMO: Final = 50_000


class KeyServiceHandlers(LimitHandlers, LifecycleHandlers, keys_pb2_grpc.KeyServiceServicer):
    """The KeyService servicer; answers UNAVAILABLE until the domain service is attached."""

    def __init__(self) -> None:
        self.service = None
        # Serialized VerifyKey responses, by the identity of a reused verdict (see Verification):
        # cached keys get the same verdict object call after call, so the Key message is built and
        # serialized once per snapshot instead of on every call.
        self._responses: dict[int, tuple[Verification, bytes]] = {}
        # For keys with limits, the response without its limit and lease fields, by the snapshot's
        # identity and the result: a verdict built per call (a lease's) appends its usage_bytes.
        self._heads: dict[tuple[int, VerifyResult], tuple[KeyRecord, bytes]] = {}
        # VerifyKey requests that name more than a key, by their SHA-256 (never by their bytes,
        # which hold the secret): what they asked, so that a repeated request is not parsed.
        self._shapes: dict[bytes, RequestShape] = {}

    def _verify_response(self, verdict: Verification) -> bytes:
        if verdict.reused:
            memo = self._responses.get(id(verdict))
            if memo is not None and memo[0] is verdict:  # the id is only trusted for the same object
                return memo[1]
        if verdict.limit is not None or verdict.lease is not None:
            serialized = self._head(verdict) + usage_bytes(verdict.limit, verdict.lease)
        else:
            key = key_to_proto(verdict.key, utc_now()) if verdict.key is not None else None
            serialized = keys_pb2.VerifyKeyResponse(
                result=_RESULTS[verdict.result], key=key
            ).SerializeToString()
        if verdict.reused:
            if len(self._responses) >= _MAX_MEMO:
                self._responses.clear()
            self._responses[id(verdict)] = (verdict, serialized)
        return serialized

    def _remember(self, digest: bytes, secret: bytes, required: Requirements, cost: int) -> None:
        if len(self._shapes) >= _MAX_MEMO:
            self._shapes.clear()
        self._shapes[digest] = RequestShape(hash_key(secret), required, cost)

    def _head(self, verdict: Verification) -> bytes:
        record = verdict.key
        assert record is not None  # limits are only spent for existing keys
        memo_key = (id(record), verdict.result)
        memo = self._heads.get(memo_key)
        if memo is not None and memo[0] is record:
            return memo[1]
        head = keys_pb2.VerifyKeyResponse(
            result=_RESULTS[verdict.result], key=key_to_proto(record, utc_now())
        ).SerializeToString()
        if len(self._heads) >= _MAX_MEMO:
            self._heads.clear()
        self._heads[memo_key] = (record, head)
        return head

    @translate_errors
    async def CreateKey(
        self,
        request: keys_pb2.CreateKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.CreateKeyRequest, keys_pb2.CreateKeyResponse],
    ) -> keys_pb2.CreateKeyResponse:
        """Create a key and return its secret, this once."""
        spec = KeySpec(
            owner_id=request.owner_id,
            name=request.name,
            scopes=list(request.scopes),
            resources=list(request.resources),
            prefix=request.prefix,
            ttl=duration("ttl", request.ttl) if request.HasField("ttl") else None,
            expire_time=timestamp_field(request, "expire_time"),
            rate_limit_per_minute=request.rate_limit_per_minute,
            metadata=metadata_from_proto(request.metadata),
            limits=limit_specs(request.limits),
            credits=credits_from_proto(request.credits) if request.HasField("credits") else None,
            secret_hash=request.secret_hash,
            secret_hint=request.secret_hint,
        )
        created = await self._service().create_key(spec, authorization=authorization(context))
        return keys_pb2.CreateKeyResponse(key=key_to_proto(created.key, utc_now()), secret=created.secret)

    @translate_errors
    async def GetKey(
        self,
        request: keys_pb2.GetKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.GetKeyRequest, keys_pb2.GetKeyResponse],
    ) -> keys_pb2.GetKeyResponse:
        """Return one key."""
        record = await self._service().get_key(request.id, authorization=authorization(context))
        return keys_pb2.GetKeyResponse(key=key_to_proto(record, utc_now()))

    @translate_errors
    async def ListKeys(
        self,
        request: keys_pb2.ListKeysRequest,
        context: grpc.aio.ServicerContext[keys_pb2.ListKeysRequest, keys_pb2.ListKeysResponse],
    ) -> keys_pb2.ListKeysResponse:
        """Return one page of an owner's keys."""
        page = await self._service().list_keys(
            request.owner_id,
            page_size=request.page_size,
            page_token=request.page_token,
            include_inactive=request.include_inactive,
            authorization=authorization(context),
            created_by=request.created_by,
            secret_hint=request.secret_hint,
        )
        now = utc_now()
        return keys_pb2.ListKeysResponse(
            keys=[key_to_proto(record, now) for record in page.keys], next_page_token=page.next_page_token
        )

    async def VerifyKey(  # type: ignore[override]  # bytes in and out: see add_to_server
        self,
        request: bytes,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> bytes:
        """Judge a presented key; an invalid key is an answer, not an error.

        A cached key is answered without suspending, and a request naming only a key is not
        even parsed (``key_only``); anything else takes the full path. Errors are translated
        inline rather than by ``translate_errors``, whose extra coroutine per call is a
        measurable share of a cache hit.
        """
        try:
            service = self.service
            if service is None:
                raise StoreUnavailable()
            key = key_only(request)
            digest = None
            if key is not None:
                verdict = service.verifier.verify_cached(key)
            else:
                shape = self._shapes.get(digest := sha256(request).digest())
                verdict = service.verifier.verify_shape(shape) if shape is not None else None
            if verdict is None:
                parsed = parse_request(keys_pb2.VerifyKeyRequest, request)
                scopes, resource = parsed.required_scopes, parsed.resource
                cost = validated_cost(parsed.cost, parsed.lease_units)  # before any cached answer
                if digest is not None and not parsed.lease_units:  # not tried above: more than a key
                    secret, required = parsed.key.encode(), requirements(scopes, resource)
                    verdict = service.verifier.verify_cached(secret, required, cost)
                    if verdict is not None:  # the request is valid: remember its shape
                        self._remember(digest, secret, required, cost)
                if verdict is None:
                    verdict = await service.verifier.verify_key(
                        parsed.key,
                        scopes,
                        resource,
                        cost=cost,
                        lease_units=parsed.lease_units,
                        # Metadata is only read when the mode needs a caller key.
                        authorization=authorization(context) if service.verify_auth_required else "",
                    )
            return self._verify_response(verdict)
        except Exception as exc:
            await abort_for("VerifyKey", exc, context)

    async def WatchKeyEvents(  # type: ignore[override]  # bytes in, bytes written: see add_to_server
        self,
        request: bytes,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        """READY, then an INVALIDATE per batch of changed keys, a HEARTBEAT when idle.

        Messages are written pre-serialized (one INVALIDATE is shared by every subscriber), and
        each write can be interrupted by the hub, so a client that stops reading is ended with
        UNAVAILABLE instead of holding its stream open.
        """
        try:
            service = self._service()
            parsed = parse_request(keys_pb2.WatchKeyEventsRequest, request)
            subscription, interval = await service.watch_key_events(
                duration("heartbeat_interval", parsed.heartbeat_interval)
                if parsed.HasField("heartbeat_interval")
                else None,
                authorization=authorization(context),
            )
            try:
                ready = keys_pb2.WatchKeyEventsResponse(type=keys_pb2.KEY_EVENT_TYPE_READY)
                ready.heartbeat_interval.FromTimedelta(interval)
                ready.max_staleness.FromTimedelta(service.max_staleness)
                await subscription.write(context.write, ready.SerializeToString())
                seconds = interval.total_seconds()
                while True:
                    await subscription.write(context.write, await subscription.next_message(seconds))
            finally:
                subscription.close()
        except Exception as exc:
            await abort_for("WatchKeyEvents", exc, context)


class _Registration:
    """Stands in for the server while the generated code registers the service: keeps the table."""

    def __init__(self) -> None:
        self.service = ""
        self.table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: add_to_server registers the edited table both ways."""

    def add_registered_method_handlers(
        self, service: str, table: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.table = service, table


def add_to_server(servicer: KeyServiceHandlers, server: grpc.aio.Server) -> None:
    """Register KeyService with every request taken as bytes and parsed by ``parse_request``.

    Bytes that do not parse are then a bad request (INVALID_ARGUMENT naming ``request``), like
    any other. VerifyKey also returns serialized bytes (no response serializer): most of its
    answers are memoized responses, and a request that names only a key skips parsing
    (``key_only``). WatchKeyEvents writes pre-serialized messages shared by all subscribers.
    """
    registration = _Registration()
    keys_pb2_grpc.add_KeyServiceServicer_to_server(servicer, registration)  # type: ignore[arg-type]
    if "VerifyKey" not in registration.table:  # stubs from grpcio-tools < 1.62 only register generically
        raise RuntimeError("keystile.v1 stubs are too old to register; regenerate them with `make proto`")
    methods = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].methods_by_name
    raw = {
        "VerifyKey": grpc.unary_unary_rpc_method_handler(servicer.VerifyKey),
        "WatchKeyEvents": grpc.unary_stream_rpc_method_handler(servicer.WatchKeyEvents),
    }
    table = {
        name: raw[name]
        if name in raw
        else _parsing(name, getattr(keys_pb2, methods[name].input_type.name), handler)
        for name, handler in registration.table.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(registration.service, table),))
    server.add_registered_method_handlers(registration.service, table)  # type: ignore[attr-defined]


def _parsing(
    name: str, message_type: type[Message], handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler that takes the request's bytes and parses them with ``parse_request``."""
    behavior: Any = handler.unary_unary  # the servicer's async method (typed for sync servers)

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            message = parse_request(message_type, request)
        except InvalidArgument as exc:
            await abort_for(name, exc, context)
        return await behavior(message, context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
