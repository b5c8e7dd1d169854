"""Domain values: keys as stored, keys to insert, and verification verdicts.

Plain frozen dataclasses and enums: the store fills them from rows, the handlers turn them into
protobuf. Neither SQL nor protobuf appears here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple


class KeyState(enum.Enum):
    """Lifecycle state, always computed at read time from the stored timestamps."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    DISABLED = "disabled"

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
    USAGE_EXCEEDED = "usage_exceeded"
    DISABLED = "disabled"

    __hash__ = object.__hash__  # as KeyState's


class CreditRefill(enum.Enum):
    """How often a key's credit balance is reset to its refill amount."""

    NEVER = ""
    DAILY = "daily"
    MONTHLY = "monthly"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit + burst`` units in any interval of ``window_ms`` milliseconds."""

    name: str
    limit: int
    window_ms: int
    burst: int = 0

    @property
    def cap(self) -> int:
        """The most units one window admits."""
        return self.limit + self.burst


@dataclass(frozen=True, slots=True)
class CreditTerms:
    """A key's credits as configured: the starting balance and how it is refilled."""

    remaining: int
    refill_amount: int = 0
    refill: CreditRefill = CreditRefill.NEVER


@dataclass(frozen=True, slots=True)
class OwnerPolicy:
    """The rules every key of one owner is held to (0 / None / () meaning no rule)."""

    owner_id: str
    max_active_keys: int = 0
    max_key_lifetime: timedelta | None = None
    limits: tuple[RateLimit, ...] = ()
    update_time: datetime | None = None


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
    limits: tuple[RateLimit, ...] = ()
    credits: CreditTerms | None = None


@dataclass(frozen=True, slots=True)
class ImportedKey:
    """A validated key from another system: what CreateKey stores, and the history it had there."""

    key: NewKey
    create_time: datetime | None = None
    revoke_time: datetime | None = None
    revoke_reason: str | None = None
    last_used_time: datetime | None = None
    disabled: bool = False


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
    limits: tuple[RateLimit, ...] = ()
    """The key's own rate limits, ``rate_limit_per_minute`` included (as "per_minute")."""
    credits: CreditTerms | None = None
    """The key's credit terms (``remaining`` is 0 here: the balance is read apart), or None."""
    owner_limits: tuple[RateLimit, ...] = ()
    """The owner policy's shared limits, on snapshots loaded for verification."""
    disable_time: datetime | None = None
    """When the key was switched off; None while it is on (disabling is reversible)."""
    replaces: str | None = None
    """The id of the key this one was rolled from."""
    replaced_by: str | None = None
    """The id of the key this one was rolled into."""
    grant_id: str | None = None
    """The first key of a roll's lineage, when this key was rolled from another (see ``grant``)."""

    @property
    def grant(self) -> str:
        """What a key's rate limits and credits belong to: shared by every secret rolled from one key."""
        return self.grant_id or self.id

    @property
    def limited(self) -> bool:
        """Whether a VALID verification of this key spends units (of limits or credits)."""
        return bool(self.limits or self.owner_limits or self.credits is not None)

    def state(self, now: datetime) -> KeyState:
        """Revocation wins over expiry, and both over disabling (which is the only reversible one)."""
        if self.revoke_time is not None:
            return KeyState.REVOKED
        if self.expire_time is not None and self.expire_time <= now:
            return KeyState.EXPIRED
        if self.disable_time is not None:
            return KeyState.DISABLED
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


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """The limit that decided a verification (the one closest to exhaustion), for headers.

    ``remaining`` is an upper bound for a rate limit (other processes may hold units) and exact
    for credits; ``reset`` is how many seconds until units are next available.
    """

    name: str
    limit: int
    remaining: int
    reset: float
    window_ms: int = 0
    owner: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """Units handed to a caching client, to spend within ``valid_for`` seconds of its request."""

    units: int
    valid_for: float


class Verification(NamedTuple):
    """The answer to VerifyKey: a result, and the key for every result but MALFORMED and NOT_FOUND.

    ``reused`` marks a memoized verdict: while it holds, the service answers the same cached key
    snapshot, scopes and resource with this very object, so a transport may memoize by identity
    what it derives from it (a serialized response). Other verdicts are built per call.
    ``limit`` describes the deciding limit of a key with limits or credits; ``lease`` the units
    granted to a caching client.
    """

    result: VerifyResult
    key: KeyRecord | None = None
    reused: bool = False
    limit: LimitStatus | None = None
    lease: Lease | None = None
