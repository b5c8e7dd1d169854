"""Reading and writing the gRPC wire: request bytes, call metadata and well-known types.

Shared by every gRPC surface module (``handlers``, ``limit_handlers``); no rule lives here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from .errors import StoreUnavailable, violation_error

if TYPE_CHECKING:
    from .service import KeyService

M = TypeVar("M", bound=Message)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)


def set_timestamp(field: timestamp_pb2.Timestamp, value: datetime) -> None:
    """``field.FromDatetime(value)`` for an aware datetime, exactly, at a quarter of the cost.

    Timestamp.FromDatetime is pure Python in protobuf; every uncached VerifyKey (and every key a
    read RPC returns) builds one to four of them.
    """
    elapsed = value - _EPOCH
    field.seconds = elapsed // _SECOND
    field.nanos = elapsed.microseconds * 1000


def parse_request(message_type: type[M], data: bytes) -> M:
    """``data`` parsed as ``message_type``; INVALID_ARGUMENT (field ``request``) when it cannot be.

    Every KeyService method takes its request as bytes and parses it here, so that bytes that
    are not the message (or nest deeper than the parser allows) are a bad request, answered
    like any other, rather than gRPC's UNKNOWN and a traceback in the log.
    """
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise violation_error("request", f"is not a valid {message_type.DESCRIPTOR.full_name}") from exc


def duration(field: str, value: duration_pb2.Duration) -> timedelta:
    """A Duration as a timedelta; INVALID_ARGUMENT naming ``field`` when it is out of range."""
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError) as exc:
        raise violation_error(field, "is not a valid duration") from exc


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``authorization`` metadata value, or "" when absent."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


class ServiceAccess:
    """What every servicer part shares: the domain service, once the database is connected."""

    service: KeyService | None

    def _service(self) -> KeyService:
        """The domain service; UNAVAILABLE until the server has connected to the database."""
        if self.service is None:
            raise StoreUnavailable()
        return self.service
