"""UsageStore: the SQL behind limits: the lease statement, credit balances and owner policies.

It shares ``KeyStore``'s guarded pool, so every statement has the same deadline and the same
outage handling. The lease is one call of ``keystile.lease_units`` (migration 0003), which is the
reference for the algorithm docs/LIMITS.md describes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ..errors import KeyLimitReached, NoCredits
from ..model import CreditRefill, CreditTerms, OwnerPolicy, RateLimit
from .connections import GuardedPool, Query

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]

_LEASE: Final = "SELECT * FROM keystile.lease_units(%s, %s, %s, %s, %s, %s, %s)"
_POLICY_COLUMNS: Final = "owner_id, max_active_keys, max_key_lifetime_ms, shared_limits, update_time"
_GET_POLICY: Final = f"SELECT {_POLICY_COLUMNS} FROM keystile.owner_policies WHERE owner_id = %s"
_SET_POLICY: Final = f"""
    INSERT INTO keystile.owner_policies (owner_id, max_active_keys, max_key_lifetime_ms, shared_limits)
    VALUES (%(owner_id)s, %(max_active_keys)s, %(lifetime_ms)s, %(limits)s)
    ON CONFLICT (owner_id) DO UPDATE
       SET max_active_keys = EXCLUDED.max_active_keys, max_key_lifetime_ms = EXCLUDED.max_key_lifetime_ms,
           shared_limits = EXCLUDED.shared_limits, update_time = now()
    RETURNING {_POLICY_COLUMNS}
"""
_DELETE_POLICY: Final = "DELETE FROM keystile.owner_policies WHERE owner_id = %s"
# Taken inside CreateKey's transaction: the row lock makes concurrent creates for one owner
# queue, so that each counts the keys the others inserted (race-free max_active_keys).
_LOCK_POLICY: Final = (
    "SELECT max_active_keys, max_key_lifetime_ms FROM keystile.owner_policies WHERE owner_id = %s FOR UPDATE"
)
_ACTIVE_KEYS: Final = """
    SELECT count(*) FROM keystile.keys
     WHERE owner_id = %s AND revoke_time IS NULL AND (expire_time IS NULL OR expire_time > now())
"""
_INSERT_CREDITS: Final = """
    INSERT INTO keystile.key_credits (key_id, remaining, refill_amount, refill, refilled_at)
    VALUES (%s, %s, %s, %s, now())
"""
_CREDITS_COLUMNS: Final = "c.remaining, c.refill_amount, c.refill"
# A refill period that has begun since the balance was last written counts as refilled.
_PERIOD_START: Final = "date_trunc(CASE c.refill WHEN 'daily' THEN 'day' ELSE 'month' END, now(), 'UTC')"
_CREDITS_NOW: Final = f"""
    CASE WHEN c.refill IS NOT NULL AND c.refilled_at < {_PERIOD_START}
         THEN c.refill_amount ELSE c.remaining END
"""
_GET_CREDITS: Final = f"""
    SELECT {_CREDITS_NOW}, c.refill_amount, c.refill
      FROM keystile.key_credits AS c JOIN keystile.keys AS k ON k.id = c.key_id
     WHERE c.key_id = %(id)s AND (%(owner_id)s::text IS NULL OR (k.owner_id = %(owner_id)s
           AND NOT ('admin' = ANY(k.scopes))))
"""
# Changing a balance is a key event (unlike spending it): processes drop what they leased and
# refused, so that credits added to an exhausted key are usable at once.
_UPDATE_CREDITS: Final = f"""
    WITH changed AS (
        UPDATE keystile.key_credits AS c
           SET remaining = CASE WHEN %(set)s::bigint IS NOT NULL THEN %(set)s::bigint
                                ELSE {_CREDITS_NOW} + %(add)s::bigint END,
               refilled_at = CASE WHEN c.refill IS NULL THEN c.refilled_at
                                  ELSE greatest(c.refilled_at, {_PERIOD_START}) END
         WHERE c.key_id = %(id)s
        RETURNING {_CREDITS_COLUMNS}, c.key_id
    )
    SELECT changed.remaining, changed.refill_amount, changed.refill,
           keystile.announce_keys(ARRAY[k.secret_hash])::text
      FROM changed JOIN keystile.keys AS k ON k.id = changed.key_id
"""


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """What one lease statement granted, and where each counter stood afterwards.

    ``remaining`` and ``reset_ms`` follow the counters' order; ``credits_left`` is None without
    credits, and ``credits_reset_ms`` None without a refill.
    """

    granted: int
    valid_ms: int
    periods: int
    period_ms: int
    remaining: tuple[int, ...]
    reset_ms: tuple[int, ...]
    credits_left: int | None
    credits_reset_ms: int | None


def limits_from_json(value: Any) -> tuple[RateLimit, ...]:
    """Limits as stored in a jsonb column."""
    return tuple(
        RateLimit(str(item["name"]), int(item["limit"]), int(item["window_ms"]), int(item.get("burst", 0)))
        for item in value or ()
    )


def limits_to_json(limits: Sequence[RateLimit]) -> Jsonb:
    """Limits for a jsonb column."""
    return Jsonb(
        [{"name": x.name, "limit": x.limit, "window_ms": x.window_ms, "burst": x.burst} for x in limits]
    )


def credit_terms_from_json(value: Any) -> CreditTerms | None:
    """Credit terms as stored in keys.credit_terms (the balance is not part of them)."""
    if value is None:
        return None
    return CreditTerms(0, int(value.get("refill_amount", 0)), CreditRefill(value.get("refill") or ""))


def credit_terms_to_json(terms: CreditTerms | None) -> Jsonb | None:
    """Credit terms for keys.credit_terms."""
    if terms is None:
        return None
    return Jsonb({"refill_amount": terms.refill_amount, "refill": terms.refill.value or None})


def _credits(row: Sequence[Any]) -> CreditTerms:
    return CreditTerms(int(row[0]), int(row[1]), CreditRefill(row[2] or ""))


def _policy(row: Sequence[Any]) -> OwnerPolicy:
    return OwnerPolicy(
        owner_id=row[0],
        max_active_keys=int(row[1]),
        max_key_lifetime=timedelta(milliseconds=row[2]) if row[2] is not None else None,
        limits=limits_from_json(row[3]),
        update_time=row[4],
    )


class UsageStore:
    """Limit persistence over ``KeyStore``'s guarded pool."""

    def __init__(self, guard: GuardedPool, *, on_query: Callable[[str], None]) -> None:
        self._guard = guard
        self._on_query = on_query

    async def _run(self, operation: str, query: Query[T], *, read: bool) -> T:
        self._on_query(operation)
        return await self._guard.run(operation, query, retry=read)

    async def lease(
        self,
        names: Sequence[str],
        caps: Sequence[int],
        windows_ms: Sequence[int],
        *,
        credit_key: str | None,
        want: int,
        need: int,
        periods: int = 1,
    ) -> LeaseResult:
        """Lease up to ``want`` units (at least ``need``, or none) in one statement.

        With ``periods`` above 1 a key far from its limits may get a schedule: that many units in
        each of up to ``periods`` consecutive periods (``LeaseResult.periods``).

        Never retried: a lease that may have committed is spent (its units are lost, never
        granted twice).
        """
        params = (
            list(names),
            list(caps),
            list(windows_ms),
            uuid.UUID(credit_key) if credit_key else None,
            want,
            need,
            periods,
        )

        async def query(conn: Conn) -> LeaseResult:
            cur = await conn.execute(_LEASE, params)
            row = await cur.fetchone()
            assert row is not None
            return LeaseResult(
                granted=int(row[0]),
                valid_ms=int(row[1]),
                periods=int(row[2]),
                period_ms=int(row[3]),
                remaining=tuple(max(int(x), 0) for x in row[4] or ()),  # a lowered limit leaves < 0
                reset_ms=tuple(int(x) for x in row[5] or ()),
                credits_left=int(row[6]) if row[6] is not None else None,
                credits_reset_ms=int(row[7]) if row[7] is not None else None,
            )

        return await self._run("lease_units", query, read=False)

    async def get_credits(self, key_id: str, *, owner_id: str | None) -> CreditTerms | None:
        """The key's credits with their current balance; None without credits (or out of reach)."""
        params = {"id": uuid.UUID(key_id), "owner_id": owner_id}

        async def query(conn: Conn) -> CreditTerms | None:
            cur = await conn.execute(_GET_CREDITS, params)
            row = await cur.fetchone()
            return _credits(row) if row else None

        return await self._run("get_credits", query, read=True)

    async def update_credits(self, key_id: str, *, set_to: int | None, add: int) -> CreditTerms:
        """Set or add to a balance and announce the change; NoCredits when the key has none."""
        params = {"id": uuid.UUID(key_id), "set": set_to, "add": add}

        async def query(conn: Conn) -> CreditTerms:
            cur = await conn.execute(_UPDATE_CREDITS, params)
            row = await cur.fetchone()
            if row is None:
                raise NoCredits()
            return _credits(row)

        return await self._run("update_credits", query, read=False)

    async def get_policy(self, owner_id: str) -> OwnerPolicy | None:
        """The owner's policy, or None."""

        async def query(conn: Conn) -> OwnerPolicy | None:
            cur = await conn.execute(_GET_POLICY, (owner_id,))
            row = await cur.fetchone()
            return _policy(row) if row else None

        return await self._run("get_policy", query, read=True)

    async def set_policy(self, policy: OwnerPolicy) -> OwnerPolicy:
        """Store (replace) an owner's policy; its keys' snapshots are announced as changed."""
        lifetime = policy.max_key_lifetime
        params = {
            "owner_id": policy.owner_id,
            "max_active_keys": policy.max_active_keys,
            "lifetime_ms": lifetime // timedelta(milliseconds=1) if lifetime is not None else None,
            "limits": limits_to_json(policy.limits),
        }

        async def query(conn: Conn) -> OwnerPolicy:
            cur = await conn.execute(_SET_POLICY, params)
            row = await cur.fetchone()
            assert row is not None
            return _policy(row)

        return await self._run("set_policy", query, read=False)

    async def delete_policy(self, owner_id: str) -> None:
        """Remove an owner's policy, if it has one."""

        async def query(conn: Conn) -> None:
            await conn.execute(_DELETE_POLICY, (owner_id,))

        await self._run("delete_policy", query, read=False)


async def enforce_policy(
    conn: Conn, owner_id: str, expire_time: datetime | None, now: datetime
) -> str | None:
    """Inside CreateKey's transaction: lock the owner's policy and check the new key against it.

    Raises KeyLimitReached when the owner already holds ``max_active_keys``; returns a
    description of the lifetime rule when ``expire_time`` breaks it (the caller names the field),
    else None.
    """
    cur = await conn.execute(_LOCK_POLICY, (owner_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    max_active, lifetime_ms = int(row[0]), row[1]
    if lifetime_ms is not None:
        longest = timedelta(milliseconds=lifetime_ms)
        if expire_time is None or expire_time > now + longest:
            return f"must be set, at most {longest} from now (the owner's policy)"
    if max_active:
        cur = await conn.execute(_ACTIVE_KEYS, (owner_id,))
        count = await cur.fetchone()
        if count is not None and int(count[0]) >= max_active:
            raise KeyLimitReached(max_active)
    return None


async def insert_credits(conn: Conn, key_id: uuid.UUID, credits: CreditTerms) -> None:
    """Inside CreateKey's transaction: the new key's starting balance."""
    await conn.execute(
        _INSERT_CREDITS, (key_id, credits.remaining, credits.refill_amount, credits.refill.value or None)
    )
