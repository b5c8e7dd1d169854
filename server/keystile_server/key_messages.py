"""The Key message: a stored key as the API shows it, and the Key fields requests carry.

Shared by every handler that returns keys (``handlers``, ``lifecycle_handlers``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2

from keystile.v1 import keys_pb2

from .errors import violation_error
from .limit_handlers import credits_to_proto, limits_to_proto
from .model import KeyRecord, KeyState
from .wire import set_timestamp

_STATES = {
    KeyState.ACTIVE: keys_pb2.KEY_STATE_ACTIVE,
    KeyState.REVOKED: keys_pb2.KEY_STATE_REVOKED,
    KeyState.EXPIRED: keys_pb2.KEY_STATE_EXPIRED,
    KeyState.DISABLED: keys_pb2.KEY_STATE_DISABLED,
}


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
        limits=limits_to_proto(record.limits),
        disabled=record.disable_time is not None,
        replaces=record.replaces or "",
        replaced_by=record.replaced_by or "",
    )
    if record.credits is not None:
        key.credits.CopyFrom(credits_to_proto(record.credits))
    key.metadata.update(record.metadata)
    set_timestamp(key.create_time, record.create_time)
    if record.expire_time is not None:
        set_timestamp(key.expire_time, record.expire_time)
    if record.revoke_time is not None:
        set_timestamp(key.revoke_time, record.revoke_time)
    if record.last_used_time is not None:
        set_timestamp(key.last_used_time, record.last_used_time)
    return key


def metadata_from_proto(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as the dict stored in JSONB (INVALID_ARGUMENT for what JSON cannot hold)."""
    try:
        return json_format.MessageToDict(struct)
    except ValueError as exc:  # NaN or infinity: JSON (and so our JSONB column) cannot hold them
        raise violation_error("metadata", "must not contain NaN or infinite numbers") from exc


def timestamp_field(message: Any, name: str, field: str = "") -> datetime | None:
    """A message's Timestamp field ``name`` (None when unset); INVALID_ARGUMENT naming ``field``."""
    if not message.HasField(name):
        return None
    try:
        value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise violation_error(field or name, "is not a valid timestamp") from exc
    return value
