"""The one mapping from domain errors to gRPC statuses.

Every RPC method is wrapped by ``translate_errors``. A ``KeystileError`` becomes its status code
with ``google.rpc.ErrorInfo`` (stable reason, domain ``keystile.dev``) and, whenever fields are at
fault (a bad request, or a create that would escalate privileges), ``google.rpc.BadRequest`` naming
each one. Anything else is a bug or a driver failure: it is
logged here with its traceback and the client gets a generic INTERNAL, never the driver's text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import (
    AdminKeyExists,
    EventsUnavailable,
    InvalidArgument,
    KeyLimitReached,
    KeyNotFound,
    KeyStateConflict,
    KeystileError,
    LookupsOverloaded,
    NoCredits,
    PermissionDenied,
    PolicyNotFound,
    SecretHashExists,
    StoreUnavailable,
    TooManyWatchers,
    Unauthenticated,
)
from .log_throttle import LogThrottle

ERROR_DOMAIN: Final = "keystile.dev"
INTERNAL_REASON: Final = "INTERNAL_ERROR"

_log = logging.getLogger(__name__)

# Looked up along the exception's MRO, so a subclass inherits its parent's code.
_CODES: Final[dict[type[KeystileError], int]] = {
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
    KeyNotFound: code_pb2.NOT_FOUND,
    PolicyNotFound: code_pb2.NOT_FOUND,
    NoCredits: code_pb2.FAILED_PRECONDITION,
    KeyLimitReached: code_pb2.RESOURCE_EXHAUSTED,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    AdminKeyExists: code_pb2.FAILED_PRECONDITION,
    KeyStateConflict: code_pb2.FAILED_PRECONDITION,
    SecretHashExists: code_pb2.ALREADY_EXISTS,
    StoreUnavailable: code_pb2.UNAVAILABLE,
    EventsUnavailable: code_pb2.UNAVAILABLE,
    LookupsOverloaded: code_pb2.UNAVAILABLE,
    TooManyWatchers: code_pb2.RESOURCE_EXHAUSTED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _code_for(exc: KeystileError) -> int:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return int(_CODES[cls])
    return int(code_pb2.INTERNAL)


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status a client sees for ``exc``."""
    if isinstance(exc, KeystileError):
        code, message, reason = _code_for(exc), exc.message, exc.reason
    else:
        code, message, reason = code_pb2.INTERNAL, "internal error", INTERNAL_REASON
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]
    if isinstance(exc, KeystileError) and exc.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        details.append(_pack(bad_request))
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")
Method = Callable[[Self_, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


_throttle = LogThrottle(_log)
# Expected under load or outage, one per call: worth a line, not a line per call.
_TRANSIENT: Final = (StoreUnavailable, EventsUnavailable, LookupsOverloaded, TooManyWatchers)


async def abort_for(name: str, exc: Exception, context: grpc.aio.ServicerContext[Req, Resp]) -> NoReturn:
    """End the call with the status for ``exc``, logging it at most once per interval per kind.

    The decorator below calls this; a method that cannot afford its extra coroutine (VerifyKey)
    or that takes raw bytes calls it from its own ``except Exception``, so every error leaves
    the same way. Nothing from the request is logged but the names of the fields at fault.
    """
    if isinstance(exc, KeystileError):
        kind = f"{name}:{exc.reason}"
        if isinstance(exc, _TRANSIENT):
            _throttle.log(logging.WARNING, kind, "%s: %s", name, exc.message)
        elif isinstance(exc, InvalidArgument):
            fields = ", ".join(sorted({v.field.split("[")[0] for v in exc.violations})) or "request"
            _throttle.log(logging.INFO, kind, "%s: bad request (%s)", name, fields)
        await context.abort_with_status(to_status(exc))  # type: ignore[attr-defined]
    _throttle.log(logging.ERROR, f"{name}:{type(exc).__name__}", "unexpected error in %s", name, exc_info=exc)
    await context.abort_with_status(to_status(Exception()))  # type: ignore[attr-defined]
    raise AssertionError("unreachable: abort_with_status raises")


def translate_errors(method: Method[Self_, Req, Resp]) -> Method[Self_, Req, Resp]:
    """Wrap a unary servicer method so that every exception leaves as a well-formed status."""

    @functools.wraps(method)
    async def wrapper(self: Self_, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await abort_for(method.__name__, exc, context)

    return wrapper
