"""Domain errors: what can go wrong, named in the domain's words rather than the driver's.

Handlers never see psycopg exceptions; the store translates them into these, and ``rpc_errors``
maps each class to exactly one gRPC status code and ErrorInfo reason::

    KeystileError              (.violations: the fields at fault, when there are any)
    ├── InvalidArgument        INVALID_ARGUMENT
    │   └── InvalidPageToken   INVALID_ARGUMENT
    ├── Unauthenticated        UNAUTHENTICATED   (reason says which: missing, malformed, unknown, ...)
    ├── PermissionDenied       PERMISSION_DENIED
    ├── KeyNotFound            NOT_FOUND
    ├── PolicyNotFound         NOT_FOUND         (GetOwnerPolicy: the owner has no policy)
    ├── NoCredits              FAILED_PRECONDITION (credits RPCs on a key without credits)
    ├── KeyLimitReached        RESOURCE_EXHAUSTED (CreateKey: the owner holds max_active_keys)
    ├── SecretHashExists       ALREADY_EXISTS    (CreateKey with secret_hash: a key has that hash)
    ├── AdminKeyExists         FAILED_PRECONDITION
    ├── KeyStateConflict       FAILED_PRECONDITION (reason says which: KEY_NOT_ACTIVE, KEY_ALREADY_ROLLED,
    │                                               KEY_STILL_ACTIVE)
    ├── StoreUnavailable       UNAVAILABLE
    ├── LookupsOverloaded      UNAVAILABLE       (too many lookups already waiting for the database)
    ├── EventsUnavailable      UNAVAILABLE       (WatchKeyEvents: events may be lost; resubscribe)
    └── TooManyWatchers        RESOURCE_EXHAUSTED (WatchKeyEvents: --max-watchers streams are open)
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

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations or []


class InvalidArgument(KeystileError):
    """The request breaks the API contract; nothing was written."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}" if fields else "invalid request", violations)


class InvalidPageToken(InvalidArgument):
    """The page token was tampered with, expired, or belongs to a different listing."""

    reason = "INVALID_PAGE_TOKEN"

    def __init__(self) -> None:
        super().__init__([FieldViolation("page_token", "page token is invalid for this request")])


class Unauthenticated(KeystileError):
    """The caller's credentials are missing or do not name a usable key; says which, never echoes them."""

    MESSAGES = {
        "CREDENTIALS_MISSING": "authorization metadata with a Bearer key is required",
        "CREDENTIALS_MALFORMED": "the authorization metadata is not 'Bearer <key>' with a well-formed key",
        "CREDENTIALS_UNKNOWN": "the caller's key does not exist",
        "CREDENTIALS_REVOKED": "the caller's key is revoked",
        "CREDENTIALS_EXPIRED": "the caller's key has expired",
        "CREDENTIALS_DISABLED": "the caller's key is disabled",
    }

    def __init__(self, reason: str) -> None:
        super().__init__(self.MESSAGES[reason])
        self.reason = reason


class PermissionDenied(KeystileError):
    """The caller is authenticated but its key may not do this; the offending fields are named."""

    def __init__(self, message: str, reason: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message, violations)
        self.reason = reason


class AdminKeyExists(KeystileError):
    """Bootstrap refused: an active admin key already exists (use --force to mint another)."""

    reason = "ADMIN_KEY_EXISTS"

    def __init__(self) -> None:
        super().__init__("an active admin key already exists")


class KeyNotFound(KeystileError):
    """No key has the requested id."""

    reason = "KEY_NOT_FOUND"

    def __init__(self) -> None:
        super().__init__("key not found")


class PolicyNotFound(KeystileError):
    """The owner has no policy."""

    reason = "POLICY_NOT_FOUND"

    def __init__(self) -> None:
        super().__init__("the owner has no policy")


class NoCredits(KeystileError):
    """The key carries no credits, so there is no balance to read or change."""

    reason = "KEY_HAS_NO_CREDITS"

    def __init__(self) -> None:
        super().__init__("the key has no credits; create it with credits to meter its uses")


class KeyStateConflict(KeystileError):
    """The key's lifecycle state does not allow the action (rolling a revoked key, deleting an active one)."""

    MESSAGES = {
        "KEY_NOT_ACTIVE": "the key is revoked or expired: it can no longer change or be rolled",
        "KEY_ALREADY_ROLLED": "the key was already rolled; roll the key that replaced it",
        "KEY_STILL_ACTIVE": "only a revoked or expired key can be deleted; revoke it first",
    }

    def __init__(self, reason: str) -> None:
        super().__init__(self.MESSAGES[reason])
        self.reason = reason


class SecretHashExists(KeystileError):
    """A key with this secret hash is already stored (a caller-minted secret used twice)."""

    reason = "SECRET_HASH_EXISTS"

    def __init__(self) -> None:
        super().__init__("a key with this secret_hash already exists; mint a new secret")


class KeyLimitReached(KeystileError):
    """The owner already holds as many active keys as its policy allows."""

    reason = "KEY_LIMIT_REACHED"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the owner already holds {limit} active keys, its policy's max_active_keys; revoke one first"
        )


class StoreUnavailable(KeystileError):
    """The database cannot be reached; the answer is unknown, not negative."""

    reason = "DATABASE_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the key store is unavailable; retry later")


class LookupsOverloaded(KeystileError):
    """Refused at once: as many lookups as allowed are already waiting for the database."""

    reason = "LOOKUPS_OVERLOADED"

    def __init__(self) -> None:
        super().__init__("too many key lookups are waiting for the database; retry later")


class TooManyWatchers(KeystileError):
    """Refused: this process already serves as many WatchKeyEvents streams as allowed."""

    reason = "TOO_MANY_WATCHERS"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this server already serves {limit} WatchKeyEvents streams; retry later or elsewhere"
        )


class EventsUnavailable(KeystileError):
    """Key events cannot be delivered (listener down, subscriber too slow, or shutdown)."""

    reason = "EVENTS_UNAVAILABLE"

    def __init__(self, why: str) -> None:
        super().__init__(f"key events are not being delivered ({why}); drop cached verdicts and resubscribe")


def violation_error(field: str, description: str) -> InvalidArgument:
    """Shorthand for a request with a single bad field."""
    return InvalidArgument([FieldViolation(field, description)])
