"""Request builders for usage limits: rate limits, credits and owner policies.

``rate_limit("per_second", 10, 1)`` and ``credits(1000, refill="monthly")`` build the messages
that ``create_key(limits=..., credits=...)`` and ``set_owner_policy`` take; docs/LIMITS.md says
what the server does with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import timedelta
from typing import Final, Literal

from .v1 import keys_pb2

RefillName = Literal["", "daily", "monthly"]
_REFILLS: Final = {
    "": keys_pb2.CREDIT_REFILL_UNSPECIFIED,
    "daily": keys_pb2.CREDIT_REFILL_DAILY,
    "monthly": keys_pb2.CREDIT_REFILL_MONTHLY,
}


def _seconds(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def rate_limit(name: str, limit: int, window: timedelta | float, *, burst: int = 0) -> keys_pb2.RateLimit:
    """At most ``limit`` (plus ``burst``) uses in any interval of ``window`` (seconds or a timedelta)."""
    message = keys_pb2.RateLimit(name=name, limit=limit, burst=burst)
    message.window.FromTimedelta(_seconds(window))
    return message


def credits(remaining: int, *, refill: RefillName = "", refill_amount: int = 0) -> keys_pb2.Credits:
    """A starting balance of uses, optionally reset to ``refill_amount`` every day or month (UTC)."""
    return keys_pb2.Credits(remaining=remaining, refill_amount=refill_amount, refill=_REFILLS[refill])


def owner_policy(
    owner_id: str,
    *,
    max_active_keys: int = 0,
    max_key_lifetime: timedelta | float | None = None,
    limits: Iterable[keys_pb2.RateLimit] = (),
) -> keys_pb2.OwnerPolicy:
    """An owner policy for ``set_owner_policy`` (0 / None / no limits meaning no rule)."""
    policy = keys_pb2.OwnerPolicy(owner_id=owner_id, max_active_keys=max_active_keys, limits=list(limits))
    if max_key_lifetime is not None:
        policy.max_key_lifetime.FromTimedelta(_seconds(max_key_lifetime))
    return policy


def update_credits_request(
    key_id: str, *, set_to: int | None, add: int | None
) -> keys_pb2.UpdateCreditsRequest:
    """An UpdateCreditsRequest: exactly one of ``set_to`` and ``add``."""
    if (set_to is None) == (add is None):
        raise ValueError("give set_to or add, exactly one")
    if add is not None:
        return keys_pb2.UpdateCreditsRequest(id=key_id, add=add)
    assert set_to is not None
    return keys_pb2.UpdateCreditsRequest(id=key_id, set=set_to)


MAX_LEASE: Final = 10_000
"""The most units one lease asks for (VerifyKeyRequest.lease_units' bound too)."""
LEASE_SHARE: Final = 0.8
"""The share of the expected demand over a lease's lifetime to ask for: a little less, so that a
lease runs out (and the next is asked for) rather than expires with units no one can use."""


class LeaseSizer:
    """How many units to lease for one key: what its caller is expected to spend while a lease lasts.

    Units that expire unspent are lost to every caller until they leave the window, so a lease
    should hold a little less than the demand seen since the last one, over the time the last one
    lasted (the next one most likely lasts as long).
    Shared by the server's allowances and the caching clients (docs/LIMITS.md).
    """

    __slots__ = ("demand", "since", "valid_for")

    def __init__(self) -> None:
        self.demand = 0
        """Units asked for since the last lease (admitted or not)."""
        self.since = 0.0
        self.valid_for = 0.0

    def want(self, now: float, need: int, share: float = LEASE_SHARE) -> int:
        """Units to ask for at ``now`` (seconds, monotonic), at least ``need``.

        ``share`` of the expected demand: less than 1 near a limit, where units that expire
        unspent are lost to others; more than 1 far from every limit, where they are not missed
        and running short would cost another lease.
        """
        rate = self.rate(now)
        if not rate:
            return 2 * need  # nothing known yet: this request's units and one more, to learn
        expected = math.ceil(rate * self.valid_for * share)
        return min(max(expected, need), MAX_LEASE)

    def rate(self, now: float) -> float:
        """Units asked for per second since the last lease (0 before the first)."""
        elapsed = now - self.since
        return self.demand / elapsed if self.valid_for > 0 and elapsed > 0 else 0.0

    def leased(self, now: float, valid_for: float) -> None:
        """A lease was granted at ``now``, lasting ``valid_for`` seconds (0: refused)."""
        self.since = now
        self.demand = 0
        if valid_for > 0:
            self.valid_for = valid_for
