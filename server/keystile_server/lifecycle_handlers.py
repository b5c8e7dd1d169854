"""gRPC translation for the key lifecycle: UpdateKey, RollKey, RevokeKey, DeleteKey, ListAuditEvents.

``LifecycleHandlers`` is the part of the KeyService servicer behind those RPCs. As in
``handlers``, no rule lives here: ``lifecycle`` and ``audit`` decide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from keystile.v1 import keys_pb2

from .audit import AuditEvent, AuditFilter
from .errors import InvalidArgument
from .importing import ImportRow
from .key_messages import key_to_proto, metadata_from_proto, timestamp_field
from .limit_handlers import limit_specs
from .rpc_errors import translate_errors
from .service import utc_now
from .wire import ServiceAccess, authorization, duration, set_timestamp


def _update_values(key: keys_pb2.Key, paths: list[str]) -> dict[str, Any]:
    """The request's value for each path of the mask (unknown paths are the domain's to refuse)."""
    values: dict[str, Any] = {}
    for path in paths:
        if path in ("name", "disabled"):
            values[path] = getattr(key, path)
        elif path in ("scopes", "resources"):
            values[path] = list(getattr(key, path))
        elif path == "metadata":
            values[path] = metadata_from_proto(key.metadata)
        elif path == "expire_time":
            values[path] = timestamp_field(key, "expire_time", "key.expire_time")
        elif path == "limits":
            values[path] = limit_specs(key.limits, "key.limits")
    return values


def _value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if value is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = value
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, list):
        message.list_value.extend(value)
    else:
        message.struct_value.update(value)
    return message


def audit_event_to_proto(event: AuditEvent) -> keys_pb2.AuditEvent:
    """A recorded action as the API's AuditEvent."""
    message = keys_pb2.AuditEvent(
        id=event.id,
        action=event.action,
        actor_key_id=event.actor,
        key_id=event.key_id or "",
        owner_id=event.owner_id or "",
        changes=[
            keys_pb2.FieldChange(field=name, old_value=_value(change["old"]), new_value=_value(change["new"]))
            for name, change in sorted(event.changes.items())
        ],
    )
    set_timestamp(message.event_time, event.event_time)
    return message


def _import_row(key: keys_pb2.ImportedKey) -> ImportRow:
    """One ImportedKey as the domain's row; a field that cannot be read is reported, not raised."""
    unreadable: list[tuple[str, str]] = []

    def read(name: str, reader: Callable[[], Any], default: Any) -> Any:
        try:
            return reader()
        except InvalidArgument as exc:
            unreadable.extend((v.field, v.description) for v in exc.violations)
            return default

    times = {
        name: read(name, lambda name=name: timestamp_field(key, name), None)  # type: ignore[misc]
        for name in ("create_time", "expire_time", "revoke_time", "last_used_time")
    }
    return ImportRow(
        secret_hash=key.secret_hash,
        owner_id=key.owner_id,
        name=key.name,
        scopes=list(key.scopes),
        resources=list(key.resources),
        secret_hint=key.secret_hint,
        prefix=key.prefix,
        revoke_reason=key.revoke_reason,
        limits=read("limits", lambda: limit_specs(key.limits), ()),
        metadata=read("metadata", lambda: metadata_from_proto(key.metadata), {}),
        disabled=key.disabled,
        rate_limit_per_minute=key.rate_limit_per_minute,
        unreadable=tuple(unreadable),
        **times,
    )


class LifecycleHandlers(ServiceAccess):
    """The servicer's lifecycle RPCs; mixed into ``KeyServiceHandlers``."""

    @translate_errors
    async def UpdateKey(
        self, request: keys_pb2.UpdateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.UpdateKeyResponse:
        """Change the fields the update mask names."""
        paths = list(request.update_mask.paths)
        record = await self._service().lifecycle.update_key(
            request.key.id, paths, _update_values(request.key, paths), authorization=authorization(context)
        )
        return keys_pb2.UpdateKeyResponse(key=key_to_proto(record, utc_now()))

    @translate_errors
    async def RollKey(
        self, request: keys_pb2.RollKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.RollKeyResponse:
        """Mint a new secret for a key's grant; the old one lasts the grace period."""
        grace = duration("grace_period", request.grace_period) if request.HasField("grace_period") else None
        rolled = await self._service().lifecycle.roll_key(
            request.id, grace, authorization=authorization(context)
        )
        now = utc_now()
        return keys_pb2.RollKeyResponse(
            key=key_to_proto(rolled.key, now),
            secret=rolled.secret,
            replaced=key_to_proto(rolled.replaced, now),
        )

    @translate_errors
    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.RevokeKeyResponse:
        """Revoke a key, and with cascade every key it created."""
        record, cascaded = await self._service().lifecycle.revoke_key(
            request.id, request.reason, cascade=request.cascade, authorization=authorization(context)
        )
        return keys_pb2.RevokeKeyResponse(
            key=key_to_proto(record, utc_now()), cascaded_ids=[key.id for key in cascaded]
        )

    @translate_errors
    async def DeleteKey(
        self, request: keys_pb2.DeleteKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.DeleteKeyResponse:
        """Delete a revoked or expired key for good."""
        await self._service().lifecycle.delete_key(request.id, authorization=authorization(context))
        return keys_pb2.DeleteKeyResponse()

    @translate_errors
    async def ImportKeys(
        self, request: keys_pb2.ImportKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.ImportKeysResponse:
        """Import keys by hash; every row is reported."""
        outcomes = await self._service().importer.import_keys(
            [_import_row(key) for key in request.keys], authorization=authorization(context)
        )
        return keys_pb2.ImportKeysResponse(
            results=[
                keys_pb2.ImportKeyResult(
                    index=o.index, id=o.key.id if o.key else "", error=o.error, fields=o.fields
                )
                for o in outcomes
            ],
            imported=sum(1 for o in outcomes if o.key is not None),
        )

    @translate_errors
    async def ListAuditEvents(
        self, request: keys_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.ListAuditEventsResponse:
        """One page of audit events, newest first."""
        selected = AuditFilter(
            owner_id=request.owner_id,
            key_id=request.key_id,
            actor=request.actor_key_id,
            start_time=timestamp_field(request, "start_time"),
            end_time=timestamp_field(request, "end_time"),
        )
        events, token = await self._service().audit.list(
            selected,
            page_size=request.page_size,
            page_token=request.page_token,
            authorization=authorization(context),
        )
        return keys_pb2.ListAuditEventsResponse(
            events=[audit_event_to_proto(event) for event in events], next_page_token=token
        )
