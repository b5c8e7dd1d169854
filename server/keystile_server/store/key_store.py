"""KeyStore: the SQL behind every key operation, over a psycopg_pool connection pool."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import StoreUnavailable
from ..model import KeyRecord, NewKey, PageCursor

_log = logging.getLogger(__name__)
T = TypeVar("T")

_COLUMNS: Final = (
    "id, owner_id, name, prefix, secret_hint, scopes, resources, metadata, rate_limit_per_minute, "
    "create_time, expire_time, revoke_time, revoke_reason, last_used_time, created_by, secret_hash"
)

_INSERT: Final = f"""
    INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint, scopes, resources,
                               metadata, rate_limit_per_minute, expire_time, created_by)
    VALUES (%(id)s, %(owner_id)s, %(name)s, %(prefix)s, %(secret_hash)s, %(secret_hint)s, %(scopes)s,
            %(resources)s, %(metadata)s, %(rate_limit_per_minute)s, %(expire_time)s, %(created_by)s)
    RETURNING {_COLUMNS}
"""
_BY_ID: Final = f"SELECT {_COLUMNS} FROM keystile.keys WHERE id = %s"
# One statement for a whole batch of cache misses: ~10x the lookups/s of one query per key.
_BY_HASHES: Final = f"SELECT {_COLUMNS} FROM keystile.keys WHERE secret_hash = ANY(%s)"

# Revoking twice keeps the first time and reason: SET expressions see the row's old values.
_REVOKE_SET: Final = """
    UPDATE keystile.keys
       SET revoke_time = COALESCE(revoke_time, now()),
           revoke_reason = CASE WHEN revoke_time IS NULL THEN %(reason)s ELSE revoke_reason END
"""
_REVOKE: Final = f"{_REVOKE_SET} WHERE id = %(id)s RETURNING {_COLUMNS}"
_REVOKE_OWNED: Final = f"{_REVOKE_SET} WHERE id = %(id)s AND owner_id = %(owner_id)s RETURNING {_COLUMNS}"
_HAS_ADMIN: Final = """
    SELECT EXISTS (
        SELECT 1 FROM keystile.keys
         WHERE 'admin' = ANY(scopes) AND revoke_time IS NULL AND (expire_time IS NULL OR expire_time > %s)
    )
"""

# Four fixed statements rather than one with "x IS NULL OR ..." branches, so that each gets a
# plan that walks the (owner_id, create_time DESC, id DESC) index.
_ACTIVE_FILTER: Final = "AND revoke_time IS NULL AND (expire_time IS NULL OR expire_time > %(now)s)"
_AFTER_FILTER: Final = "AND (create_time, id) < (%(after_time)s, %(after_id)s)"
_LIST: Final = {
    (active, paged): f"""
        SELECT {_COLUMNS} FROM keystile.keys
         WHERE owner_id = %(owner_id)s {_ACTIVE_FILTER if active else ""} {_AFTER_FILTER if paged else ""}
         ORDER BY create_time DESC, id DESC
         LIMIT %(limit)s
    """
    for active in (False, True)
    for paged in (False, True)
}

# One statement per flush for every key used in it; the WHERE clause keeps writes to at most one a
# minute per key even when several server processes flush the same key.
_RECORD_USAGE: Final = """
    UPDATE keystile.keys AS k
       SET last_used_time = u.used
      FROM unnest(%(ids)s::uuid[], %(used)s::timestamptz[]) AS u(id, used)
     WHERE k.id = u.id
       AND (k.last_used_time IS NULL OR k.last_used_time <= u.used - make_interval(secs => %(min_secs)s))
"""


def _ignore(operation: str) -> None:
    """The default ``on_query``: count nothing."""


def _record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        id=str(row[0]),
        owner_id=row[1],
        name=row[2],
        prefix=row[3],
        secret_hint=row[4],
        scopes=tuple(row[5]),
        resources=tuple(row[6]),
        metadata=row[7],
        rate_limit_per_minute=int(row[8]),
        create_time=row[9],
        expire_time=row[10],
        revoke_time=row[11],
        revoke_reason=row[12],
        last_used_time=row[13],
        created_by=row[14],
        secret_hash=bytes(row[15]),
    )


class KeyStore:
    """Key persistence over an async connection pool that the caller opens and closes."""

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]],
        *,
        on_query: Callable[[str], None] | None = None,
    ) -> None:
        self._pool = pool
        # Told the name of every statement run: the server counts them for /metrics.
        self._on_query = on_query or _ignore

    @classmethod
    def create_pool(
        cls, conninfo: str, *, min_size: int, max_size: int, timeout: float
    ) -> AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]:
        """A closed pool configured for keystile; open it with ``await pool.open()``."""
        return AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            name="keystile",
            kwargs={"autocommit": True, "application_name": "keystile"},
        )

    @asynccontextmanager
    async def _connection(self, operation: str) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """A pooled connection; unreachable-database failures surface as StoreUnavailable."""
        self._on_query(operation)
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            # Connection refused, dropped, or no connection free in time: the answer is unknown.
            _log.warning("database unavailable: %s", type(exc).__name__)
            raise StoreUnavailable() from exc

    async def _read(
        self, operation: str, query: Callable[[psycopg.AsyncConnection[TupleRow]], Awaitable[T]]
    ) -> T:
        """Run a read-only query, retrying once on a connection that turned out to be dead.

        After a database restart the pool may still hold connections to the old server; a read
        is safe to repeat, and the pool discards the broken connection before the retry.
        """
        try:
            async with self._connection(operation) as conn:
                return await query(conn)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, PoolTimeout):
                raise  # no connection came in time: waiting again would only double the delay
            async with self._connection(operation) as conn:
                return await query(conn)

    async def ping(self) -> None:
        """Round-trip to the database; raise StoreUnavailable when it cannot be reached."""
        async with self._connection("ping") as conn:
            await conn.execute("SELECT 1")

    async def insert_key(self, new: NewKey) -> KeyRecord:
        """Insert a validated key and return it as stored."""
        params = {
            "id": uuid.UUID(new.id),
            "owner_id": new.owner_id,
            "name": new.name,
            "prefix": new.prefix,
            "secret_hash": new.secret_hash,
            "secret_hint": new.secret_hint,
            "scopes": list(new.scopes),
            "resources": list(new.resources),
            "metadata": Jsonb(new.metadata),
            "rate_limit_per_minute": new.rate_limit_per_minute,
            "expire_time": new.expire_time,
            "created_by": new.created_by,
        }
        async with self._connection("insert_key") as conn:
            cur = await conn.execute(_INSERT, params)
            row = await cur.fetchone()
        assert row is not None
        return _record(row)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key with this id, or None."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> KeyRecord | None:
            cur = await conn.execute(_BY_ID, (uuid.UUID(key_id),))
            row = await cur.fetchone()
            return _record(row) if row else None

        return await self._read("get_key", query)

    async def find_by_hashes(self, secret_hashes: Sequence[bytes]) -> dict[bytes, KeyRecord]:
        """The keys whose secrets hash to any of ``secret_hashes``, by hash; unknown ones are absent."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> dict[bytes, KeyRecord]:
            cur = await conn.execute(_BY_HASHES, (list(secret_hashes),))
            records = (_record(row) for row in await cur.fetchall())
            return {record.secret_hash: record for record in records}

        return await self._read("find_by_hashes", query)

    async def list_keys(
        self, owner_id: str, *, active_at: datetime | None, after: PageCursor | None, limit: int
    ) -> list[KeyRecord]:
        """Up to ``limit`` of an owner's keys, newest first, strictly after ``after``.

        ``active_at`` set means only keys neither revoked nor expired at that instant.
        """
        params: dict[str, Any] = {"owner_id": owner_id, "limit": limit, "now": active_at}
        if after is not None:
            params["after_time"] = after.create_time
            params["after_id"] = uuid.UUID(after.id)
        sql = _LIST[(active_at is not None, after is not None)]

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> list[KeyRecord]:
            cur = await conn.execute(sql, params)
            return [_record(row) for row in await cur.fetchall()]

        return await self._read("list_keys", query)

    async def revoke_key(self, key_id: str, reason: str | None, *, owner_id: str | None) -> KeyRecord | None:
        """Revoke the key (idempotently) and return it; None when no such key exists.

        With ``owner_id`` only a key of that owner is revoked; another owner's key is left alone
        and reported as missing.
        """
        params = {"id": uuid.UUID(key_id), "reason": reason, "owner_id": owner_id}
        async with self._connection("revoke_key") as conn:
            cur = await conn.execute(_REVOKE if owner_id is None else _REVOKE_OWNED, params)
            row = await cur.fetchone()
        return _record(row) if row else None

    async def has_active_admin_key(self, now: datetime) -> bool:
        """Whether any key granting ``admin`` is neither revoked nor expired at ``now``."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> bool:
            cur = await conn.execute(_HAS_ADMIN, (now,))
            row = await cur.fetchone()
            return bool(row and row[0])

        return await self._read("has_active_admin_key", query)

    async def record_usage(self, used: dict[str, datetime], *, min_interval_seconds: float) -> None:
        """Set last_used_time for many keys in one statement, skipping keys written too recently."""
        if not used:
            return
        ids = [uuid.UUID(key_id) for key_id in used]
        params = {"ids": ids, "used": list(used.values()), "min_secs": min_interval_seconds}
        async with self._connection("record_usage") as conn:
            await conn.execute(_RECORD_USAGE, params)

    async def server_secret(self, name: str) -> bytes:
        """A server-wide secret created by a migration (such as the page-token signing key)."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> bytes:
            cur = await conn.execute("SELECT value FROM keystile.server_secrets WHERE name = %s", (name,))
            row = await cur.fetchone()
            if row is None:
                raise RuntimeError(f"server secret {name!r} is missing; run `keystile migrate`")
            return bytes(row[0])

        return await self._read("server_secret", query)
