"""The SQL of a key's life after creation: update, roll, revoke (with cascade), delete, purge.

Each change is one transaction that locks the key's row, makes the change, and records it in the
audit trail (``insert_audit``) before committing; the keys table's trigger announces the change
to every cache in the same commit (migration 0002).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ..audit import AuditEntry, json_value, key_entry
from ..errors import KeyStateConflict, violation_error
from ..model import KeyRecord, KeyState
from .audit_store import insert_audit
from .connections import GuardedStore
from .key_store import KEY_COLUMNS, TENANT_REACH, key_record
from .usage_store import limits_to_json, policy_lifetime

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]

_LOCK: Final = f"SELECT {KEY_COLUMNS} FROM keystile.keys WHERE id = %(id)s FOR UPDATE"
_LOCK_OWNED: Final = (
    f"SELECT {KEY_COLUMNS} FROM keystile.keys WHERE id = %(id)s AND {TENANT_REACH} FOR UPDATE"
)
_ROLL_INSERT: Final = f"""
    INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint, scopes, resources,
                               metadata, rate_limit_per_minute, expire_time, created_by, limits,
                               credit_terms, disable_time, replaces, grant_id)
    SELECT %(new_id)s, owner_id, name, prefix, %(secret_hash)s, %(secret_hint)s, scopes, resources,
           metadata, rate_limit_per_minute, expire_time, created_by, limits, credit_terms, disable_time,
           id, coalesce(grant_id, id)
      FROM keystile.keys WHERE id = %(id)s
    RETURNING {KEY_COLUMNS}
"""
_ROLL_OLD: Final = f"""
    UPDATE keystile.keys
       SET replaced_by = %(new_id)s,
           expire_time = CASE WHEN expire_time IS NULL OR expire_time > %(until)s THEN %(until)s
                              ELSE expire_time END
     WHERE id = %(id)s
    RETURNING {KEY_COLUMNS}
"""
# The key's creations, their creations, and so on (created_by holds the creating key's id as
# text), revoked in one statement; keys already revoked keep their first time and reason.
_REVOKE_DESCENDANTS_WHERE: Final = """
    WITH RECURSIVE lineage(id) AS (
        SELECT id FROM keystile.keys WHERE created_by = %(root)s
        UNION
        SELECT k.id FROM keystile.keys AS k JOIN lineage AS l ON k.created_by = l.id::text
    )
    UPDATE keystile.keys
       SET revoke_time = now(), revoke_reason = %(reason)s
     WHERE id IN (SELECT id FROM lineage) AND revoke_time IS NULL
"""
_REVOKE_DESCENDANTS: Final = f"{_REVOKE_DESCENDANTS_WHERE} RETURNING {KEY_COLUMNS}"
_REVOKE_DESCENDANTS_OWNED: Final = f"{_REVOKE_DESCENDANTS_WHERE} AND {TENANT_REACH} RETURNING {KEY_COLUMNS}"
_REVOKE: Final = f"""
    UPDATE keystile.keys
       SET revoke_time = COALESCE(revoke_time, now()),
           revoke_reason = CASE WHEN revoke_time IS NULL THEN %(reason)s ELSE revoke_reason END
     WHERE id = %(id)s
    RETURNING {KEY_COLUMNS}
"""
_DELETE: Final = "DELETE FROM keystile.keys WHERE id = ANY(%s)"
# A grant's credits go with its last key.
_DELETE_ORPHAN_CREDITS: Final = """
    DELETE FROM keystile.key_credits AS c
     WHERE c.key_id = ANY(%s)
       AND NOT EXISTS (SELECT 1 FROM keystile.keys AS k WHERE coalesce(k.grant_id, k.id) = c.key_id)
"""
_PURGEABLE: Final = f"""
    SELECT {KEY_COLUMNS} FROM keystile.keys
     WHERE revoke_time < %(cutoff)s OR (revoke_time IS NULL AND expire_time < %(cutoff)s)
     ORDER BY id LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
"""
PURGE_BATCH: Final = 1000

# Fields UpdateKey may set, as the keys table's columns.
_UPDATABLE: Final = (
    "name",
    "scopes",
    "resources",
    "metadata",
    "expire_time",
    "limits",
    "rate_limit_per_minute",
)


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """Validated new values for UpdateKey: only the fields named are changed."""

    values: dict[str, Any]
    """Column name to new value, for columns in ``_UPDATABLE``."""
    disabled: bool | None = None
    """True or False to switch the key off or on; None to leave it."""


class LifecycleStore(GuardedStore):
    """Key changes after creation, each with its audit event, over ``KeyStore``'s guarded pool."""

    @staticmethod
    async def _lock(conn: Conn, key_id: str, owner_id: str | None) -> KeyRecord | None:
        params = {"id": uuid.UUID(key_id), "owner_id": owner_id}
        cur = await conn.execute(_LOCK if owner_id is None else _LOCK_OWNED, params)
        row = await cur.fetchone()
        return key_record(row) if row else None

    async def update_key(
        self, key_id: str, update: KeyUpdate, *, owner_id: str | None, actor: str, now: datetime
    ) -> KeyRecord | None:
        """Apply ``update`` to a live key and return it as changed; None when out of reach.

        A revoked or expired key cannot change (KEY_NOT_ACTIVE): revocation and expiry are final.
        A new expire_time is held to the owner policy's lifetime, like CreateKey's.
        """
        assignments: list[sql.Composable] = [
            sql.SQL("{} = %s").format(sql.Identifier(column)) for column in update.values
        ]
        params: list[Any] = [_column_value(column, value) for column, value in update.values.items()]
        if update.disabled is not None:
            assignments.append(
                sql.SQL("disable_time = coalesce(disable_time, now())")
                if update.disabled
                else sql.SQL("disable_time = NULL")
            )
        statement = sql.SQL("UPDATE keystile.keys SET {} WHERE id = %s RETURNING {}").format(
            sql.SQL(", ").join(assignments), sql.SQL(KEY_COLUMNS)
        )

        async def query(conn: Conn) -> KeyRecord | None:
            async with conn.transaction():
                before = await self._lock(conn, key_id, owner_id)
                if before is None:
                    return None
                if before.state(now) in (KeyState.REVOKED, KeyState.EXPIRED):
                    raise KeyStateConflict("KEY_NOT_ACTIVE")
                if "expire_time" in update.values:
                    broken = await policy_lifetime(conn, before.owner_id, update.values["expire_time"], now)
                    if broken is not None:
                        raise violation_error("key.expire_time", broken)
                cur = await conn.execute(statement, [*params, uuid.UUID(key_id)])
                row = await cur.fetchone()
                assert row is not None
                after = key_record(row)
                await insert_audit(conn, key_entry(_update_action(update), actor, before, after))
                return after

        return await self._run("update_key", query, read=False)

    async def roll_key(
        self,
        key_id: str,
        *,
        secret_hash: bytes,
        secret_hint: str,
        until: datetime,
        owner_id: str | None,
        actor: str,
        now: datetime,
    ) -> tuple[KeyRecord, KeyRecord] | None:
        """Mint a new key for the grant of ``key_id`` and end the old secret at ``until``.

        Returns (old as changed, new), or None when out of reach. The new key copies the grant
        (owner, name, prefix, scopes, resources, metadata, limits, credit terms, expiry, disabled)
        and shares its rate-limit counters and credits (``grant_id``).
        """
        new_id = uuid.uuid4()
        params = {
            "id": uuid.UUID(key_id),
            "new_id": new_id,
            "secret_hash": secret_hash,
            "secret_hint": secret_hint,
            "until": until,
        }

        async def query(conn: Conn) -> tuple[KeyRecord, KeyRecord] | None:
            async with conn.transaction():
                before = await self._lock(conn, key_id, owner_id)
                if before is None:
                    return None
                if before.state(now) in (KeyState.REVOKED, KeyState.EXPIRED):
                    raise KeyStateConflict("KEY_NOT_ACTIVE")
                if before.replaced_by is not None:
                    raise KeyStateConflict("KEY_ALREADY_ROLLED")
                cur = await conn.execute(_ROLL_INSERT, params)
                row = await cur.fetchone()
                assert row is not None
                new = key_record(row)
                cur = await conn.execute(_ROLL_OLD, params)
                row = await cur.fetchone()
                assert row is not None
                old = key_record(row)
                await insert_audit(conn, key_entry("key.roll", actor, before, old))
                await insert_audit(conn, key_entry("key.create", actor, None, new))
                return old, new

        return await self._run("roll_key", query, read=False)

    async def revoke_key(
        self, key_id: str, reason: str | None, *, owner_id: str | None, cascade: bool, actor: str
    ) -> tuple[KeyRecord, list[KeyRecord]] | None:
        """Revoke a key (idempotently) and, with ``cascade``, every key it created, transitively.

        Returns the key and the live keys the cascade revoked, or None when the key is out of
        reach. A tenant's cascade revokes only keys in its reach (no-escalation keeps a tenant
        key's creations in its owner anyway).
        """
        params = {"id": uuid.UUID(key_id), "reason": reason, "owner_id": owner_id}

        async def query(conn: Conn) -> tuple[KeyRecord, list[KeyRecord]] | None:
            async with conn.transaction():
                before = await self._lock(conn, key_id, owner_id)
                if before is None:
                    return None
                cur = await conn.execute(_REVOKE, params)
                row = await cur.fetchone()
                assert row is not None
                revoked = key_record(row)
                if before.revoke_time is None:
                    await insert_audit(conn, key_entry("key.revoke", actor, before, revoked))
                cascaded: list[KeyRecord] = []
                if cascade:
                    cur = await conn.execute(
                        _REVOKE_DESCENDANTS if owner_id is None else _REVOKE_DESCENDANTS_OWNED,
                        {"root": key_id, "reason": f"cascade from {key_id}", "owner_id": owner_id},
                    )
                    cascaded = [key_record(row) for row in await cur.fetchall()]
                    for key in cascaded:
                        changes = {
                            "revoke_time": {"old": None, "new": json_value(key.revoke_time)},
                            "revoke_reason": {"old": None, "new": key.revoke_reason},
                        }
                        await insert_audit(
                            conn, AuditEntry("key.revoke", actor, key.owner_id, key.id, changes)
                        )
                return revoked, cascaded

        return await self._run("revoke_key", query, read=False)

    async def delete_key(self, key_id: str, *, owner_id: str | None, actor: str, now: datetime) -> bool:
        """Delete a revoked or expired key for good (KEY_STILL_ACTIVE otherwise); False when out of reach."""

        async def query(conn: Conn) -> bool:
            async with conn.transaction():
                before = await self._lock(conn, key_id, owner_id)
                if before is None:
                    return False
                if before.state(now) not in (KeyState.REVOKED, KeyState.EXPIRED):
                    raise KeyStateConflict("KEY_STILL_ACTIVE")
                await self._delete(conn, [before], actor)
                return True

        return await self._run("delete_key", query, read=False)

    async def purge_keys(self, cutoff: datetime, *, actor: str) -> int:
        """Delete keys revoked, or expired, before ``cutoff``, in batches; how many went."""
        total = 0
        while True:

            async def query(conn: Conn) -> int:
                async with conn.transaction():
                    cur = await conn.execute(_PURGEABLE, {"cutoff": cutoff, "limit": PURGE_BATCH})
                    doomed = [key_record(row) for row in await cur.fetchall()]
                    await self._delete(conn, doomed, actor)
                    return len(doomed)

            deleted = await self._run("purge_keys", query, read=False)
            total += deleted
            if deleted < PURGE_BATCH:
                return total

    @staticmethod
    async def _delete(conn: Conn, doomed: list[KeyRecord], actor: str) -> None:
        if not doomed:
            return
        await conn.execute(_DELETE, ([uuid.UUID(k.id) for k in doomed],))
        await conn.execute(_DELETE_ORPHAN_CREDITS, ([uuid.UUID(k.grant) for k in doomed],))
        for key in doomed:
            await insert_audit(conn, key_entry("key.delete", actor, key, None))


def _column_value(column: str, value: Any) -> Any:
    if column == "metadata":
        return Jsonb(value)
    if column == "limits":
        return limits_to_json(value)
    if column in ("scopes", "resources"):
        return list(value)
    return value


def _update_action(update: KeyUpdate) -> str:
    """``key.disable`` / ``key.enable`` for a bare switch, ``key.update`` for anything else."""
    if update.values or update.disabled is None:
        return "key.update"
    return "key.disable" if update.disabled else "key.enable"
