"""The audit trail's SQL: one row per management action, written inside the action's transaction."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ..audit import AuditEntry, AuditEvent, AuditFilter
from .connections import GuardedStore

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]

_INSERT: Final = """
    INSERT INTO keystile.audit_events (action, actor, key_id, owner_id, changes)
    VALUES (%s, %s, %s, %s, %s)
"""
_COLUMNS: Final = "id, event_time, action, actor, key_id, owner_id, changes"
# Oldest first, in bounded batches: one statement never holds a lock on millions of rows.
_PURGE: Final = """
    DELETE FROM keystile.audit_events
     WHERE id IN (SELECT id FROM keystile.audit_events WHERE event_time < %s ORDER BY id LIMIT %s)
"""
PURGE_BATCH: Final = 10_000


async def insert_audit(conn: Conn, entry: AuditEntry) -> None:
    """Record ``entry``; call inside the transaction that makes the change it describes."""
    key_id = uuid.UUID(entry.key_id) if entry.key_id else None
    await conn.execute(_INSERT, (entry.action, entry.actor, key_id, entry.owner_id, Jsonb(entry.changes)))


def _event(row: tuple[Any, ...]) -> AuditEvent:
    return AuditEvent(
        id=int(row[0]),
        event_time=row[1],
        action=row[2],
        actor=row[3],
        key_id=str(row[4]) if row[4] is not None else None,
        owner_id=row[5],
        changes=row[6],
    )


class AuditStore(GuardedStore):
    """Reads and retention of the audit trail, over ``KeyStore``'s guarded pool."""

    async def list_events(self, selected: AuditFilter, before_id: int | None, limit: int) -> list[AuditEvent]:
        """Up to ``limit`` events matching ``selected``, newest first, older than ``before_id``."""
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (
            ("owner_id", selected.owner_id),
            ("key_id", uuid.UUID(selected.key_id) if selected.key_id else None),
            ("actor", selected.actor),
        ):
            if value:
                conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if selected.start_time is not None:
            conditions.append(sql.SQL("event_time >= %s"))
            params.append(selected.start_time)
        if selected.end_time is not None:
            conditions.append(sql.SQL("event_time < %s"))
            params.append(selected.end_time)
        if before_id is not None:
            conditions.append(sql.SQL("id < %s"))
            params.append(before_id)
        where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("TRUE")
        statement = sql.SQL("SELECT {} FROM keystile.audit_events WHERE {} ORDER BY id DESC LIMIT %s").format(
            sql.SQL(_COLUMNS), where
        )
        params.append(limit)

        async def query(conn: Conn) -> list[AuditEvent]:
            cur = await conn.execute(statement, params)
            return [_event(row) for row in await cur.fetchall()]

        return await self._run("list_audit_events", query, read=True)

    async def purge(self, cutoff: datetime) -> int:
        """Delete events recorded before ``cutoff``, in batches; how many went."""
        total = 0
        while True:

            async def query(conn: Conn) -> int:
                cur = await conn.execute(_PURGE, (cutoff, PURGE_BATCH))
                return cur.rowcount

            deleted = await self._run("purge_audit_events", query, read=False)
            total += deleted
            if deleted < PURGE_BATCH:
                return total
