"""Typed exceptions for failed calls, carrying the server's ErrorInfo reason.

Every failure a client method raises is a ``KeystileError``::

    KeystileError                 (any status; .code, .reason, .message, .field_violations)
    ├── InvalidArgumentError      INVALID_ARGUMENT: the request broke the contract
    ├── NotFoundError             NOT_FOUND: no such key (or not yours)
    ├── UnauthenticatedError      UNAUTHENTICATED: missing or bad caller credentials
    ├── PermissionDeniedError     PERMISSION_DENIED: the caller's key may not do this
    ├── UnavailableError          UNAVAILABLE: server or database unreachable; safe to retry
    ├── DeadlineExceededError     DEADLINE_EXCEEDED: no answer within the deadline
    └── InternalError             INTERNAL and anything else unexpected

A key that fails verification is not an error: ``verify_key`` returns its result code.
"""

from __future__ import annotations

from typing import Final

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY: Final = "grpc-status-details-bin"


class KeystileError(Exception):
    """A call failed; ``reason`` is the stable machine-readable cause from ErrorInfo."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        field_violations: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.field_violations = field_violations or {}


class InvalidArgumentError(KeystileError):
    """The request broke the API contract; ``field_violations`` names each bad field."""


class NotFoundError(KeystileError):
    """No such key, or none the caller may see."""


class UnauthenticatedError(KeystileError):
    """The caller's credentials are missing, malformed, unknown, revoked or expired."""


class PermissionDeniedError(KeystileError):
    """The caller is authenticated but may not do this."""


class FailedPreconditionError(KeystileError):
    """The key's state does not allow this (rolling a revoked key, deleting a live one): see ``reason``."""


class AlreadyExistsError(KeystileError):
    """What the call would create exists already (a key with the same secret hash)."""


class ResourceExhaustedError(KeystileError):
    """A cap was reached (the owner's max_active_keys, --max-watchers): ``reason`` says which."""


class UnavailableError(KeystileError):
    """The server or its database cannot be reached right now; retrying may succeed."""


class DeadlineExceededError(KeystileError):
    """The call did not complete within its deadline."""


class InternalError(KeystileError):
    """The server failed unexpectedly."""


_BY_CODE: Final[dict[grpc.StatusCode, type[KeystileError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(error: grpc.RpcError) -> KeystileError:
    """The typed exception for a failed call, with ErrorInfo and BadRequest details decoded."""
    call: grpc.Call = error  # type: ignore[assignment]
    code = call.code()
    message = call.details() or ""
    reason = domain = ""
    violations: dict[str, str] = {}
    for key, value in call.trailing_metadata() or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, domain = info.reason, info.domain
            elif detail.Unpack(bad_request):
                violations.update({v.field: v.description for v in bad_request.field_violations})
    cls = _BY_CODE.get(code, InternalError if code != grpc.StatusCode.OK else KeystileError)
    return cls(code, message, reason=reason, domain=domain, field_violations=violations)
