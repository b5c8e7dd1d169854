"""Domain errors: what can go wrong, named in the domain's words rather than the driver's.

Handlers never see psycopg exceptions; the store translates them into these, and ``rpc_errors``
maps each class to exactly one gRPC status code and ErrorInfo reason::

    KeystileError
    ├── InvalidArgument        INVALID_ARGUMENT  (carries one violation per bad field)
    │   └── InvalidPageToken   INVALID_ARGUMENT
    ├── KeyNotFound            NOT_FOUND
    └── StoreUnavailable       UNAVAILABLE
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, named by its protobuf field path."""

    field: str
    description: str


class KeystileError(Exception):
    """Base class of every error the domain raises on purpose."""

    reason = "KEYSTILE_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KeystileError):
    """The request breaks the API contract; nothing was written."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}" if fields else "invalid request")
        self.violations = violations


class InvalidPageToken(InvalidArgument):
    """The page token was tampered with, expired, or belongs to a different listing."""

    reason = "INVALID_PAGE_TOKEN"

    def __init__(self) -> None:
        super().__init__([FieldViolation("page_token", "page token is invalid for this request")])


class KeyNotFound(KeystileError):
    """No key has the requested id."""

    reason = "KEY_NOT_FOUND"

    def __init__(self) -> None:
        super().__init__("key not found")


class StoreUnavailable(KeystileError):
    """The database cannot be reached; the answer is unknown, not negative."""

    reason = "DATABASE_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the key store is unavailable; retry later")


def violation_error(field: str, description: str) -> InvalidArgument:
    """Shorthand for a request with a single bad field."""
    return InvalidArgument([FieldViolation(field, description)])
