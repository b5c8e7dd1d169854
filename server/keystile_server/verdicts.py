"""The verdict rules: how a presented key's snapshot is judged, and how long a verdict holds.

``judge`` applies the checks in the contract's order (revoked, expired, scopes, resource);
``holds_until`` says until when a verdict stays true for the same snapshot, which is what lets
``Verifier.verify_cached`` memoize verdicts (``Memo``) on cache entries. Both read only the
snapshot and the clock: no I/O, no protobuf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from keystile._limits import MAX_LEASE

from .metrics import HotCounter
from .model import KeyRecord, KeyState, Verification, VerifyResult
from .validation import Violations, check_resource, check_scopes, scope_covers


@dataclass(slots=True)
class Memo:
    """A verdict judged for one cached snapshot (with scopes and resource), as verify_cached reuses it.

    Beside the verdict: until when it holds, its result's counter, when a use of the key is
    next worth noting (usage writes a key at most once a minute, so the notes between are
    skipped), and whether a VALID verdict must still spend units of the key's limits.
    """

    verdict: Verification
    until: float
    counter: HotCounter
    next_use: float
    limited: bool = False


def validated_requirements(required_scopes: Sequence[str], resource: str) -> Sequence[str]:
    """The validated required scopes (InvalidArgument names every bad field)."""
    if not required_scopes and not resource:
        return ()
    errors = Violations()
    required = check_scopes(required_scopes, errors, field="required_scopes")
    if resource:
        check_resource(resource, errors, "resource")
    errors.raise_if_any()
    return required


MAX_COST: Final = 1_000
MAX_LEASE_UNITS: Final = MAX_LEASE


def validated_cost(cost: int, lease_units: int = 0) -> int:
    """The units a verification spends (0 means 1); InvalidArgument when out of range."""
    if 0 < cost <= MAX_COST and lease_units <= MAX_LEASE_UNITS:
        return cost
    if cost == 0 and lease_units <= MAX_LEASE_UNITS:
        return 1
    errors = Violations()
    if cost > MAX_COST:
        errors.add("cost", f"must be at most {MAX_COST}")
    if lease_units > MAX_LEASE_UNITS:
        errors.add("lease_units", f"must be at most {MAX_LEASE_UNITS}")
    errors.raise_if_any()
    return cost


MALFORMED: Final = Verification(VerifyResult.MALFORMED, None, True)
NOT_FOUND: Final = Verification(VerifyResult.NOT_FOUND, None, True)
MAX_VERDICTS_PER_KEY: Final = 8
"""Scope and resource combinations memoized per cached key; past this the memo starts over."""


def holds_until(record: KeyRecord, result: VerifyResult) -> float:
    """Until when (POSIX seconds) ``judge`` keeps giving ``result`` for this snapshot.

    ``judge`` reads the clock only to compare it with expire_time: REVOKED and EXPIRED are final
    for a snapshot, and every other verdict turns EXPIRED once expire_time has passed. Keep this
    next to ``judge`` and in step with it.
    """
    if result is VerifyResult.REVOKED or result is VerifyResult.EXPIRED or record.expire_time is None:
        return math.inf
    return record.expire_time.timestamp()


def judge(record: KeyRecord, required: Sequence[str], resource: str, now: datetime) -> VerifyResult:
    """The verdict for an existing key, checks in contract order (a revoked key is REVOKED first)."""
    state = record.state(now)
    if state is KeyState.REVOKED:
        return VerifyResult.REVOKED
    if state is KeyState.EXPIRED:
        return VerifyResult.EXPIRED
    if state is KeyState.DISABLED:
        return VerifyResult.DISABLED
    if required and not all(scope_covers(record.scopes, scope) for scope in required):
        return VerifyResult.INSUFFICIENT_SCOPE
    if resource and record.resources and resource not in record.resources:
        return VerifyResult.FORBIDDEN_RESOURCE
    return VerifyResult.VALID
