"""UsageStore: the SQL behind limits: the lease statement, credit balances and owner policies.

It shares ``KeyStore``'s guarded pool, so every statement has the same deadline and the same
outage handling. The lease is one call of ``keystile.lease_units`` (migration 0003), which is the
reference for the algorithm docs/LIMITS.md describes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ..audit import AuditEntry, json_value
from ..errors import KeyLimitReached, NoCredits
from ..model import CreditRefill, CreditTerms, OwnerPolicy, RateLimit
from .audit_store import insert_audit
from .connections import GuardedStore

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
      FROM keystile.keys AS k JOIN keystile.key_credits AS c ON c.key_id = coalesce(k.grant_id, k.id)
     WHERE k.id = %(id)s AND (%(owner_id)s::text IS NULL OR (k.owner_id = %(owner_id)s
           AND NOT ('admin' = ANY(k.scopes))))
"""
# Changing a balance is a key event (unlike spending it) for every key of the grant: processes
# drop what they leased and refused, so that credits added to an exhausted key are usable at once.
_UPDATE_CREDITS: Final = f"""
    WITH changed AS (
        UPDATE keystile.key_credits AS c
           SET remaining = CASE WHEN %(set)s::bigint IS NOT NULL THEN %(set)s::bigint
                                ELSE {_CREDITS_NOW} + %(add)s::bigint END,
               refilled_at = CASE WHEN c.refill IS NULL THEN c.refilled_at
                                  ELSE greatest(c.refilled_at, {_PERIOD_START}) END
         WHERE c.key_id = (SELECT coalesce(grant_id, id) FROM keystile.keys WHERE id = %(id)s)
        RETURNING {_CREDITS_COLUMNS}, c.key_id
    )
    SELECT changed.remaining, changed.refill_amount, changed.refill,
           keystile.announce_keys(ARRAY(
               SELECT secret_hash FROM keystile.keys WHERE coalesce(grant_id, id) = changed.key_id
           ))::text
      FROM changed
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


async def _locked_policy(conn: Conn, owner_id: str) -> OwnerPolicy | None:
    cur = await conn.execute(_GET_POLICY + " FOR UPDATE", (owner_id,))
    row = await cur.fetchone()
    return _policy(row) if row else None


def _policy_entry(
    action: str, actor: str, owner_id: str, before: OwnerPolicy | None, after: OwnerPolicy | None
) -> AuditEntry:
    """An audit entry for a policy change: each rule that changed, old and new."""
    changes: dict[str, dict[str, Any]] = {}
    for name in ("max_active_keys", "max_key_lifetime", "limits"):
        old = json_value(getattr(before, name)) if before is not None else None
        new = json_value(getattr(after, name)) if after is not None else None
        if old != new:
            changes[name] = {"old": old, "new": new}
    return AuditEntry(action, actor, owner_id, None, changes)


class UsageStore(GuardedStore):
    """Limit persistence over ``KeyStore``'s guarded pool."""

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

    async def update_credits(self, key_id: str, *, set_to: int | None, add: int, actor: str) -> CreditTerms:
        """Set or add to a balance, announce and audit the change; NoCredits when the key has none."""
        params = {"id": uuid.UUID(key_id), "set": set_to, "add": add, "owner_id": None}

        async def query(conn: Conn) -> CreditTerms:
            async with conn.transaction():
                cur = await conn.execute(_GET_CREDITS, params)
                row = await cur.fetchone()
                before = _credits(row) if row else None
                cur = await conn.execute(_UPDATE_CREDITS, params)
                row = await cur.fetchone()
                if row is None:
                    raise NoCredits()
                after = _credits(row)
                cur = await conn.execute("SELECT owner_id FROM keystile.keys WHERE id = %s", (params["id"],))
                owner = await cur.fetchone()
                changes = {"credits": {"old": json_value(before), "new": json_value(after)}}
                entry = AuditEntry("credits.update", actor, owner[0] if owner else None, key_id, changes)
                await insert_audit(conn, entry)
            return after

        return await self._run("update_credits", query, read=False)

    async def get_policy(self, owner_id: str) -> OwnerPolicy | None:
        """The owner's policy, or None."""

        async def query(conn: Conn) -> OwnerPolicy | None:
            cur = await conn.execute(_GET_POLICY, (owner_id,))
            row = await cur.fetchone()
            return _policy(row) if row else None

        return await self._run("get_policy", query, read=True)

    async def set_policy(self, policy: OwnerPolicy, *, actor: str) -> OwnerPolicy:
        """Store (replace) an owner's policy and audit it; its keys' snapshots are announced as changed."""
        lifetime = policy.max_key_lifetime
        params = {
            "owner_id": policy.owner_id,
            "max_active_keys": policy.max_active_keys,
            "lifetime_ms": lifetime // timedelta(milliseconds=1) if lifetime is not None else None,
            "limits": limits_to_json(policy.limits),
        }

        async def query(conn: Conn) -> OwnerPolicy:
            async with conn.transaction():
                before = await _locked_policy(conn, policy.owner_id)
                cur = await conn.execute(_SET_POLICY, params)
                row = await cur.fetchone()
                assert row is not None
                after = _policy(row)
                await insert_audit(conn, _policy_entry("policy.set", actor, policy.owner_id, before, after))
            return after

        return await self._run("set_policy", query, read=False)

    async def delete_policy(self, owner_id: str, *, actor: str) -> None:
        """Remove an owner's policy, if it has one (audited when there was one)."""

        async def query(conn: Conn) -> None:
            async with conn.transaction():
                before = await _locked_policy(conn, owner_id)
                if before is not None:
                    await conn.execute(_DELETE_POLICY, (owner_id,))
                    await insert_audit(conn, _policy_entry("policy.delete", actor, owner_id, before, None))

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
    broken = _lifetime_broken(row[1], expire_time, now)
    if broken is not None:
        return broken
    max_active = int(row[0])
    if max_active:
        cur = await conn.execute(_ACTIVE_KEYS, (owner_id,))
        count = await cur.fetchone()
        if count is not None and int(count[0]) >= max_active:
            raise KeyLimitReached(max_active)
    return None


async def policy_lifetime(
    conn: Conn, owner_id: str, expire_time: datetime | None, now: datetime
) -> str | None:
    """Inside UpdateKey's transaction: how a new ``expire_time`` breaks the owner's lifetime rule."""
    cur = await conn.execute(_LOCK_POLICY, (owner_id,))
    row = await cur.fetchone()
    return _lifetime_broken(row[1], expire_time, now) if row is not None else None


def _lifetime_broken(lifetime_ms: int | None, expire_time: datetime | None, now: datetime) -> str | None:
    if lifetime_ms is None:
        return None
    longest = timedelta(milliseconds=lifetime_ms)
    if expire_time is None or expire_time > now + longest:
        return f"must be set, at most {longest} from now (the owner's policy)"
    return None


async def insert_credits(conn: Conn, key_id: uuid.UUID, credits: CreditTerms) -> None:
    """Inside CreateKey's transaction: the new key's starting balance."""
    await conn.execute(
        _INSERT_CREDITS, (key_id, credits.remaining, credits.refill_amount, credits.refill.value or None)
    )
