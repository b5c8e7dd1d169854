"""gRPC handlers: protobuf in, one domain call, protobuf out.

No rule lives here beyond reading the wire format (oneofs, well-known types); every decision is the
domain's, and every error leaves through ``rpc_errors``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import grpc
from google.protobuf import json_format, struct_pb2

from keystile.v1 import keys_pb2, keys_pb2_grpc

from .errors import StoreUnavailable, violation_error
from .model import KeyRecord, KeyState, VerifyResult
from .rpc_errors import translate_errors, translate_stream_errors
from .service import KeyService, KeySpec, utc_now

_STATES = {
    KeyState.ACTIVE: keys_pb2.KEY_STATE_ACTIVE,
    KeyState.REVOKED: keys_pb2.KEY_STATE_REVOKED,
    KeyState.EXPIRED: keys_pb2.KEY_STATE_EXPIRED,
}
_RESULTS = {result: keys_pb2.VerifyResult.Value(f"VERIFY_RESULT_{result.name}") for result in VerifyResult}
_BARE_RESPONSES = {result: keys_pb2.VerifyKeyResponse(result=code) for result, code in _RESULTS.items()}


def key_to_proto(record: KeyRecord, now: datetime) -> keys_pb2.Key:
    """A stored key as the API's Key message (the secret is not part of either)."""
    key = keys_pb2.Key(
        id=record.id,
        owner_id=record.owner_id,
        name=record.name,
        prefix=record.prefix,
        secret_hint=record.secret_hint,
        scopes=record.scopes,
        resources=record.resources,
        rate_limit_per_minute=record.rate_limit_per_minute,
        state=_STATES[record.state(now)],
        revoke_reason=record.revoke_reason or "",
        created_by=record.created_by or "",
    )
    key.metadata.update(record.metadata)
    key.create_time.FromDatetime(record.create_time)
    for name in ("expire_time", "revoke_time", "last_used_time"):
        value = getattr(record, name)
        if value is not None:
            getattr(key, name).FromDatetime(value)
    return key


def _metadata(struct: struct_pb2.Struct) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(struct)
    except ValueError as exc:  # NaN or infinity: JSON (and so our JSONB column) cannot hold them
        raise violation_error("metadata", "must not contain NaN or infinite numbers") from exc


def _expire_time(request: keys_pb2.CreateKeyRequest) -> datetime | None:
    if not request.HasField("expire_time"):
        return None
    try:
        return request.expire_time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise violation_error("expire_time", "is not a valid timestamp") from exc


def _authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``authorization`` metadata value, or "" when absent."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


_MAX_MEMO: Final = 50_000


class KeyServiceHandlers(keys_pb2_grpc.KeyServiceServicer):
    """The KeyService servicer; answers UNAVAILABLE until the domain service is attached."""

    def __init__(self) -> None:
        self.service: KeyService | None = None
        # VerifyKey answers for cached keys repeat: the same snapshot, the same result. Building
        # the Key message costs more than the rest of a cache hit together, so each (snapshot,
        # result) pair is built once and the message reused (gRPC only serializes it).
        self._responses: dict[tuple[int, VerifyResult], tuple[KeyRecord, keys_pb2.VerifyKeyResponse]] = {}

    def _verify_response(self, result: VerifyResult, record: KeyRecord | None) -> keys_pb2.VerifyKeyResponse:
        if record is None:
            return _BARE_RESPONSES[result]
        memo_key = (id(record), result)
        memo = self._responses.get(memo_key)
        if memo is not None and memo[0] is record:  # the id is only trusted for the same object
            return memo[1]
        response = keys_pb2.VerifyKeyResponse(result=_RESULTS[result], key=key_to_proto(record, utc_now()))
        if len(self._responses) >= _MAX_MEMO:
            self._responses.clear()
        self._responses[memo_key] = (record, response)
        return response

    def _service(self) -> KeyService:
        if self.service is None:
            raise StoreUnavailable()
        return self.service

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
            ttl=request.ttl.ToTimedelta() if request.HasField("ttl") else None,
            expire_time=_expire_time(request),
            rate_limit_per_minute=request.rate_limit_per_minute,
            metadata=_metadata(request.metadata),
        )
        created = await self._service().create_key(spec, authorization=_authorization(context))
        return keys_pb2.CreateKeyResponse(key=key_to_proto(created.key, utc_now()), secret=created.secret)

    @translate_errors
    async def GetKey(
        self,
        request: keys_pb2.GetKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.GetKeyRequest, keys_pb2.GetKeyResponse],
    ) -> keys_pb2.GetKeyResponse:
        """Return one key."""
        record = await self._service().get_key(request.id, authorization=_authorization(context))
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
            authorization=_authorization(context),
        )
        now = utc_now()
        return keys_pb2.ListKeysResponse(
            keys=[key_to_proto(record, now) for record in page.keys], next_page_token=page.next_page_token
        )

    @translate_errors
    async def RevokeKey(
        self,
        request: keys_pb2.RevokeKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.RevokeKeyRequest, keys_pb2.RevokeKeyResponse],
    ) -> keys_pb2.RevokeKeyResponse:
        """Revoke a key."""
        record = await self._service().revoke_key(
            request.id, request.reason, authorization=_authorization(context)
        )
        return keys_pb2.RevokeKeyResponse(key=key_to_proto(record, utc_now()))

    @translate_errors
    async def VerifyKey(
        self,
        request: keys_pb2.VerifyKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.VerifyKeyRequest, keys_pb2.VerifyKeyResponse],
    ) -> keys_pb2.VerifyKeyResponse:
        """Judge a presented key; an invalid key is an answer, not an error."""
        service = self._service()
        verdict = await service.verify_key(
            request.key,
            request.required_scopes,
            request.resource,
            # Metadata is only read when the mode needs a caller key.
            authorization=_authorization(context) if service.verify_auth_required else "",
        )
        return self._verify_response(verdict.result, verdict.key)

    @translate_stream_errors
    async def WatchKeyEvents(
        self,
        request: keys_pb2.WatchKeyEventsRequest,
        context: grpc.aio.ServicerContext[keys_pb2.WatchKeyEventsRequest, keys_pb2.WatchKeyEventsResponse],
    ) -> AsyncIterator[keys_pb2.WatchKeyEventsResponse]:
        """READY, then an INVALIDATE per batch of changed keys, a HEARTBEAT when idle."""
        service = self._service()
        subscription, interval = await service.watch_key_events(
            request.heartbeat_interval.ToTimedelta() if request.HasField("heartbeat_interval") else None,
            authorization=_authorization(context),
        )
        try:
            ready = keys_pb2.WatchKeyEventsResponse(type=keys_pb2.KEY_EVENT_TYPE_READY)
            ready.heartbeat_interval.FromTimedelta(interval)
            ready.max_staleness.FromTimedelta(service.max_staleness)
            yield ready
            heartbeat = keys_pb2.WatchKeyEventsResponse(type=keys_pb2.KEY_EVENT_TYPE_HEARTBEAT)
            seconds = interval.total_seconds()
            while True:
                batch = await subscription.next_batch(seconds)
                if batch:
                    yield keys_pb2.WatchKeyEventsResponse(
                        type=keys_pb2.KEY_EVENT_TYPE_INVALIDATE, key_hashes=batch
                    )
                else:
                    yield heartbeat
        finally:
            subscription.close()
