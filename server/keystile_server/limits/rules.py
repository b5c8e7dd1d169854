"""What a valid rate limit or credit grant is, and what a non-admin may hand to the keys it mints.

Requests name limits with a window as a duration; the domain keeps whole milliseconds. Every
rule collects into ``Violations`` like the other field checks, naming fields by their protobuf
paths (``limits[1].window``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from ..errors import FieldViolation
from ..model import CreditRefill, CreditTerms, KeyRecord, RateLimit
from ..validation import Violations

MAX_LIMITS: Final = 8
MIN_WINDOW_MS: Final = 1_000
MAX_WINDOW_MS: Final = 86_400_000
MAX_COUNT: Final = 10**12
"""The largest limit, burst or credit amount: far beyond any real quota, and safe in SQL bigint."""
PER_MINUTE: Final = "per_minute"
"""The name ``rate_limit_per_minute`` takes among a key's limits."""
CREDITS: Final = "credits"
"""The name credits take in a LimitStatus; no rate limit may take it."""
_NAME_RE: Final = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A rate limit as a request names it, before validation."""

    name: str
    limit: int
    window: timedelta
    burst: int = 0


def check_limits(
    specs: Sequence[LimitSpec], errors: Violations, *, field: str = "limits", per_minute: int = 0
) -> tuple[RateLimit, ...]:
    """The validated limits, ``per_minute`` (``rate_limit_per_minute``) appended as one of them."""
    if len(specs) > MAX_LIMITS:
        errors.add(field, f"must hold at most {MAX_LIMITS} limits")
        return ()
    limits: list[RateLimit] = []
    names: set[str] = set()
    for index, spec in enumerate(specs):
        at = f"{field}[{index}]"
        if not _NAME_RE.match(spec.name):
            errors.add(f"{at}.name", "must be 1-32 characters of a-z 0-9 _ -, starting with a letter")
        elif spec.name in names or spec.name == CREDITS or (per_minute and spec.name == PER_MINUTE):
            errors.add(f"{at}.name", f"{spec.name!r} is taken")
        names.add(spec.name)
        if not 1 <= spec.limit <= MAX_COUNT:
            errors.add(f"{at}.limit", f"must be between 1 and {MAX_COUNT}")
        if not 0 <= spec.burst <= MAX_COUNT:
            errors.add(f"{at}.burst", f"must be between 0 and {MAX_COUNT}")
        window_ms, rest = divmod(spec.window, timedelta(milliseconds=1))
        if rest or not MIN_WINDOW_MS <= window_ms <= MAX_WINDOW_MS:
            errors.add(f"{at}.window", "must be whole milliseconds, from 1 second to 1 day")
        limits.append(RateLimit(spec.name, spec.limit, int(window_ms), spec.burst))
    if per_minute:
        limits.append(RateLimit(PER_MINUTE, per_minute, 60_000))
    return tuple(limits)


def check_credits(
    credits: CreditTerms | None, errors: Violations, *, field: str = "credits"
) -> CreditTerms | None:
    """Credits with a balance and amount in range, and a refill amount exactly when they refill."""
    if credits is None:
        return None
    if not 0 <= credits.remaining <= MAX_COUNT:
        errors.add(f"{field}.remaining", f"must be between 0 and {MAX_COUNT}")
    if not 0 <= credits.refill_amount <= MAX_COUNT:
        errors.add(f"{field}.refill_amount", f"must be between 0 and {MAX_COUNT}")
    if credits.refill is CreditRefill.NEVER and credits.refill_amount:
        errors.add(f"{field}.refill_amount", "is only meaningful with a refill period")
    if credits.refill is not CreditRefill.NEVER and not credits.refill_amount:
        errors.add(f"{field}.refill_amount", "must be positive when the credits refill")
    return credits


def _as_strict(limits: Sequence[RateLimit], bound: RateLimit) -> bool:
    """Whether some limit admits no more than ``bound`` in every interval of ``bound``'s window.

    A limit over a window at least as long, with a cap no larger, does: any shorter interval
    lies within one of its windows.
    """
    return any(limit.window_ms >= bound.window_ms and limit.cap <= bound.cap for limit in limits)


def weaker_limits(
    caller_limits: Sequence[RateLimit],
    caller_credits: CreditTerms | None,
    limits: Sequence[RateLimit],
    credits: CreditTerms | None,
) -> list[FieldViolation]:
    """Why a key with ``limits`` and ``credits`` would be less limited than its minting caller.

    Each of the caller's rate limits must be matched by one at least as strict; a caller with
    credits may only mint keys with credits that refill no more than its own.
    """
    denied = [
        FieldViolation("limits", f"must include a limit at least as strict as the caller's {bound.name!r}")
        for bound in caller_limits
        if not _as_strict(limits, bound)
    ]
    if caller_credits is not None:
        if credits is None:
            denied.append(FieldViolation("credits", "must be set: the caller's key has credits"))
        elif credits.refill_amount > caller_credits.refill_amount or (
            credits.refill is not caller_credits.refill and credits.refill is not CreditRefill.NEVER
        ):
            denied.append(FieldViolation("credits", "must refill no more than the caller's own credits"))
    return denied


@dataclass(frozen=True, slots=True)
class Counters:
    """The database counters a key's verification spends from, in the lease statement's terms."""

    names: tuple[str, ...]
    caps: tuple[int, ...]
    windows_ms: tuple[int, ...]
    limits: tuple[RateLimit, ...]
    owner: tuple[bool, ...]
    credits: bool


def counters_of(record: KeyRecord) -> Counters:
    """The counters of a key: its own limits, its owner's shared limits, and its credits.

    A counter's name carries the window, so that a limit whose window changes starts afresh
    instead of reading slots of another size.
    """
    own = [(f"k:{record.grant}:{limit.name}:{limit.window_ms}", limit, False) for limit in record.limits]
    shared = [
        (f"o:{record.owner_id}:{limit.name}:{limit.window_ms}", limit, True) for limit in record.owner_limits
    ]
    every = own + shared
    return Counters(
        names=tuple(name for name, _, _ in every),
        caps=tuple(limit.cap for _, limit, _ in every),
        windows_ms=tuple(limit.window_ms for _, limit, _ in every),
        limits=tuple(limit for _, limit, _ in every),
        owner=tuple(owner for _, _, owner in every),
        credits=record.credits is not None,
    )
