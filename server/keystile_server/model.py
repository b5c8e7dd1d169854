"""Domain values: keys as stored, keys to insert, and verification verdicts.

Plain frozen dataclasses and enums: the store fills them from rows, the handlers turn them into
protobuf. Neither SQL nor protobuf appears here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple


class KeyState(enum.Enum):
    """Lifecycle state, always computed at read time from the stored timestamps."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"

    # Members are singletons compared by identity; hashing them by identity too skips Enum's
    # Python-level __hash__, which showed up in profiles of dict lookups on the verify path.
    __hash__ = object.__hash__


class VerifyResult(enum.Enum):
    """The verdict on a presented secret, in the order the checks run."""

    VALID = "valid"
    MALFORMED = "malformed"
    NOT_FOUND = "not_found"
    REVOKED = "revoked"
    EXPIRED = "expired"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    FORBIDDEN_RESOURCE = "forbidden_resource"
    RATE_LIMITED = "rate_limited"

    __hash__ = object.__hash__  # as KeyState's


@dataclass(frozen=True, slots=True)
class NewKey:
    """A validated key ready to insert; carries the hash, never the secret."""

    id: str
    owner_id: str
    name: str
    prefix: str
    secret_hash: bytes
    secret_hint: str
    scopes: tuple[str, ...]
    resources: tuple[str, ...]
    metadata: dict[str, Any]
    rate_limit_per_minute: int
    expire_time: datetime | None
    created_by: str | None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored. ``secret_hash`` is the cache index; the secret itself exists nowhere."""

    id: str
    owner_id: str
    name: str
    prefix: str
    secret_hint: str
    scopes: tuple[str, ...]
    resources: tuple[str, ...]
    metadata: dict[str, Any]
    rate_limit_per_minute: int
    create_time: datetime
    expire_time: datetime | None
    revoke_time: datetime | None
    revoke_reason: str | None
    last_used_time: datetime | None
    created_by: str | None
    secret_hash: bytes = field(default=b"", repr=False)

    def state(self, now: datetime) -> KeyState:
        """Revocation wins over expiry: a revoked key stays revoked after it would have expired."""
        if self.revoke_time is not None:
            return KeyState.REVOKED
        if self.expire_time is not None and self.expire_time <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page of a listing starts: strictly after this (create_time, id)."""

    create_time: datetime
    id: str


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of a listing and the opaque token for the next one ("" when done)."""

    keys: list[KeyRecord]
    next_page_token: str


class Verification(NamedTuple):
    """The answer to VerifyKey: a result, and the key for every result but MALFORMED and NOT_FOUND.

    ``reused`` marks a memoized verdict: while it holds, the service answers the same cached key
    snapshot, scopes and resource with this very object, so a transport may memoize by identity
    what it derives from it (a serialized response). Other verdicts are built per call.
    """

    result: VerifyResult
    key: KeyRecord | None = None
    reused: bool = False
