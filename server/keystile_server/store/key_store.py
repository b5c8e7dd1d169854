"""KeyStore: the SQL behind every key operation, over a psycopg_pool connection pool."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ..audit import key_entry
from ..errors import SecretHashExists, violation_error
from ..model import KeyRecord, NewKey, PageCursor
from .audit_store import insert_audit
from .connections import GuardedPool, Query, bounded_conninfo
from .usage_store import (
    credit_terms_from_json,
    credit_terms_to_json,
    enforce_policy,
    insert_credits,
    limits_from_json,
    limits_to_json,
)

T = TypeVar("T")

KEY_COLUMNS: Final = (
    "id, owner_id, name, prefix, secret_hint, scopes, resources, metadata, rate_limit_per_minute, "
    "create_time, expire_time, revoke_time, revoke_reason, last_used_time, created_by, secret_hash, "
    "limits, credit_terms, disable_time, replaces, replaced_by, grant_id"
)

_INSERT: Final = f"""
    INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint, scopes, resources,
                               metadata, rate_limit_per_minute, expire_time, created_by, limits, credit_terms)
    VALUES (%(id)s, %(owner_id)s, %(name)s, %(prefix)s, %(secret_hash)s, %(secret_hint)s, %(scopes)s,
            %(resources)s, %(metadata)s, %(rate_limit_per_minute)s, %(expire_time)s, %(created_by)s,
            %(limits)s, %(credit_terms)s)
    ON CONFLICT (secret_hash) DO NOTHING
    RETURNING {KEY_COLUMNS}
"""
# What a tenant (a non-admin caller) can reach: its owner's keys, except keys granting admin.
# Keys that administer keystile are out of every tenant's reach, whatever their owner (the
# bootstrap keys' owner is "admin", and nothing stops a tenant of that name from existing).
TENANT_REACH: Final = "owner_id = %(owner_id)s AND NOT ('admin' = ANY(scopes))"
_BY_ID: Final = f"SELECT {KEY_COLUMNS} FROM keystile.keys WHERE id = %(id)s"
_BY_ID_OWNED: Final = f"SELECT {KEY_COLUMNS} FROM keystile.keys WHERE id = %(id)s AND {TENANT_REACH}"
# One statement for a whole batch of cache misses: ~10x the lookups/s of one query per key. The
# owner's shared limits come along: a verification spends them too.
_BY_HASHES: Final = f"""
    SELECT {KEY_COLUMNS}, p.shared_limits
      FROM keystile.keys LEFT JOIN keystile.owner_policies AS p USING (owner_id)
     WHERE secret_hash = ANY(%s)
"""

_ESTIMATED_KEYS: Final = "SELECT reltuples::bigint FROM pg_class WHERE oid = 'keystile.keys'::regclass"
# One row per page, the hashes concatenated: a row per hash cost Python more than the filter did.
_HASH_PAGE: Final = """
    SELECT string_agg(h, ''::bytea ORDER BY h)
      FROM (SELECT secret_hash AS h FROM keystile.keys
             WHERE secret_hash > %s ORDER BY secret_hash LIMIT %s) AS page
"""

_HAS_ADMIN: Final = """
    SELECT EXISTS (
        SELECT 1 FROM keystile.keys
         WHERE 'admin' = ANY(scopes) AND revoke_time IS NULL AND (expire_time IS NULL OR expire_time > %s)
    )
"""

# A listing's conditions, each a fixed text: every combination is an AND of some of them, and each
# walks an index (owner, created_by, hint, or create_time alone for an admin's listing of all).
_ACTIVE_FILTER: Final = "revoke_time IS NULL AND (expire_time IS NULL OR expire_time > %(now)s)"
_AFTER_FILTER: Final = "(create_time, id) < (%(after_time)s, %(after_id)s)"
_LIST_FILTERS: Final = {
    "owner": "owner_id = %(owner_id)s",
    "tenant": TENANT_REACH,
    "created_by": "created_by = %(created_by)s",
    "secret_hint": "secret_hint = %(secret_hint)s",
    "active": _ACTIVE_FILTER,
    "after": _AFTER_FILTER,
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


def key_record(row: Sequence[Any]) -> KeyRecord:
    """A row of ``KEY_COLUMNS`` (and, for verification, the owner's shared limits) as a KeyRecord."""
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
        limits=limits_from_json(row[16]),
        credits=credit_terms_from_json(row[17]),
        disable_time=row[18],
        replaces=str(row[19]) if row[19] is not None else None,
        replaced_by=str(row[20]) if row[20] is not None else None,
        grant_id=str(row[21]) if row[21] is not None else None,
        owner_limits=limits_from_json(row[22]) if len(row) > 22 else (),
    )


def new_key_params(new: NewKey) -> dict[str, Any]:
    """A validated key's columns as statement parameters (CreateKey's insert, ImportKeys' too)."""
    return {
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
        "limits": limits_to_json(new.limits),
        "credit_terms": credit_terms_to_json(new.credits),
    }


class KeyStore:
    """Key persistence over an async connection pool that the caller opens and closes.

    Every statement goes through a ``GuardedPool``: bounded by ``timeout`` seconds (the pool's
    own timeout unless given), and refused at once while the database is known unreachable.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]],
        *,
        on_query: Callable[[str], None] | None = None,
        timeout: float | None = None,
        on_outage: Callable[[str], None] | None = None,
    ) -> None:
        self.guard = GuardedPool(
            pool, timeout=timeout if timeout is not None else pool.timeout, on_outage=on_outage
        )
        # Told the name of every statement run: the server counts them for /metrics.
        self.count_query = self._on_query = on_query or _ignore

    @classmethod
    def create_pool(
        cls, conninfo: str, *, min_size: int, max_size: int, timeout: float
    ) -> AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]:
        """A closed pool configured for keystile; open it with ``await pool.open()``.

        ``timeout`` bounds taking a connection, and is also the statement timeout the server
        enforces and the TCP timeouts that detect a dead peer (see ``connections``).
        """
        return AsyncConnectionPool(
            bounded_conninfo(conninfo, timeout),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            name="keystile",
            kwargs={"autocommit": True, "application_name": "keystile"},
        )

    @property
    def outage(self) -> str:
        """Why the database is deemed unreachable right now; "" while it is not."""
        return self.guard.outage

    async def _run(self, operation: str, query: Query[T], *, read: bool) -> T:
        """Run one statement through the guard; reads are retried once on a dead connection."""
        self._on_query(operation)
        return await self.guard.run(operation, query, retry=read)

    async def close(self) -> None:
        """Close the connection pool (the one in use: an outage may have replaced the first)."""
        await self.guard.close()

    async def ping(self, timeout: float | None = None) -> None:
        """Round-trip to the database, even during an outage (it ends one); StoreUnavailable if not."""
        await self.guard.probe(self.guard.timeout if timeout is None else timeout)

    async def insert_key(
        self, new: NewKey, *, now: datetime, actor: str, expiry_field: str = "expire_time"
    ) -> KeyRecord:
        """Insert a validated key (and its credits) and its audit event; return it as stored.

        One transaction holds the owner's policy row locked while it counts the owner's active
        keys and inserts, so concurrent creates cannot together pass ``max_active_keys``.
        """
        key_id = uuid.UUID(new.id)
        params = new_key_params(new)

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> KeyRecord:
            async with conn.transaction():
                broken = await enforce_policy(conn, new.owner_id, new.expire_time, now)
                if broken is not None:
                    raise violation_error(expiry_field, broken)
                cur = await conn.execute(_INSERT, params)
                row = await cur.fetchone()
                if row is None:  # only a caller-minted secret can collide (CreateKey.secret_hash)
                    raise SecretHashExists()
                if new.credits is not None:
                    await insert_credits(conn, key_id, new.credits)
                record = key_record(row)
                await insert_audit(conn, key_entry("key.create", actor, None, record))
            return record

        return await self._run("insert_key", query, read=False)

    async def get_key(self, key_id: str, *, owner_id: str | None = None) -> KeyRecord | None:
        """The key with this id, or None; with ``owner_id``, only if it is in that tenant's reach.

        The owner is part of the statement, so another owner's key costs exactly what an
        unknown id costs: no row comes back either way (no timing oracle).
        """
        sql = _BY_ID if owner_id is None else _BY_ID_OWNED
        params = {"id": uuid.UUID(key_id), "owner_id": owner_id}

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> KeyRecord | None:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return key_record(row) if row else None

        return await self._run("get_key", query, read=True)

    async def find_by_hashes(self, secret_hashes: Sequence[bytes]) -> dict[bytes, KeyRecord]:
        """The keys whose secrets hash to any of ``secret_hashes``, by hash; unknown ones are absent."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> dict[bytes, KeyRecord]:
            cur = await conn.execute(_BY_HASHES, (list(secret_hashes),))
            records = (key_record(row) for row in await cur.fetchall())
            return {record.secret_hash: record for record in records}

        return await self._run("find_by_hashes", query, read=True)

    async def list_keys(
        self,
        owner_id: str,
        *,
        active_at: datetime | None,
        after: PageCursor | None,
        limit: int,
        tenant: bool = False,
        created_by: str = "",
        secret_hint: str = "",
    ) -> list[KeyRecord]:
        """Up to ``limit`` keys, newest first, strictly after ``after``.

        ``owner_id`` "" lists every owner's keys (for admins); ``active_at`` set means only keys
        neither revoked nor expired at that instant; ``tenant`` (a non-admin caller) leaves out
        keys granting admin; ``created_by`` and ``secret_hint`` narrow to exact matches.
        """
        params: dict[str, Any] = {
            "owner_id": owner_id,
            "limit": limit,
            "now": active_at,
            "created_by": created_by,
            "secret_hint": secret_hint,
        }
        if after is not None:
            params["after_time"] = after.create_time
            params["after_id"] = uuid.UUID(after.id)
        used = [
            name
            for name, wanted in (
                ("tenant", tenant),
                ("owner", bool(owner_id) and not tenant),
                ("created_by", bool(created_by)),
                ("secret_hint", bool(secret_hint)),
                ("active", active_at is not None),
                ("after", after is not None),
            )
            if wanted
        ]
        where = " AND ".join(_LIST_FILTERS[name] for name in used) or "TRUE"
        statement = (
            f"SELECT {KEY_COLUMNS} FROM keystile.keys WHERE {where}"
            " ORDER BY create_time DESC, id DESC LIMIT %(limit)s"
        )

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> list[KeyRecord]:
            cur = await conn.execute(statement, params)
            return [key_record(row) for row in await cur.fetchall()]

        return await self._run("list_keys", query, read=True)

    async def has_active_admin_key(self, now: datetime) -> bool:
        """Whether any key granting ``admin`` is neither revoked nor expired at ``now``."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> bool:
            cur = await conn.execute(_HAS_ADMIN, (now,))
            row = await cur.fetchone()
            return bool(row and row[0])

        return await self._run("has_active_admin_key", query, read=True)

    async def record_usage(self, used: dict[str, datetime], *, min_interval_seconds: float) -> None:
        """Set last_used_time for many keys in one statement, skipping keys written too recently."""
        if not used:
            return
        ids = [uuid.UUID(key_id) for key_id in used]
        params = {"ids": ids, "used": list(used.values()), "min_secs": min_interval_seconds}

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> None:
            await conn.execute(_RECORD_USAGE, params)

        await self._run("record_usage", query, read=False)

    async def count_keys(self) -> int:
        """About how many keys are stored: the planner's estimate, or an exact count if it has none.

        Counting a million rows exactly takes a scan; sizing a filter needs only the estimate
        that autovacuum keeps.
        """

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> int:
            cur = await conn.execute(_ESTIMATED_KEYS)
            row = await cur.fetchone()
            if row and row[0] and int(row[0]) > 0:
                return int(row[0])
            cur = await conn.execute("SELECT count(*) FROM keystile.keys")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run("count_keys", query, read=True)

    async def hash_page(self, after: bytes, limit: int) -> bytes:
        """Up to ``limit`` stored key hashes greater than ``after``, in order, concatenated."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> bytes:
            cur = await conn.execute(_HASH_PAGE, (after, limit), binary=True)
            row = await cur.fetchone()
            return bytes(row[0]) if row and row[0] is not None else b""

        return await self._run("hash_page", query, read=True)

    async def server_secret(self, name: str) -> bytes:
        """A server-wide secret created by a migration (such as the page-token signing key)."""

        async def query(conn: psycopg.AsyncConnection[TupleRow]) -> bytes:
            cur = await conn.execute("SELECT value FROM keystile.server_secrets WHERE name = %s", (name,))
            row = await cur.fetchone()
            if row is None:
                raise RuntimeError(f"server secret {name!r} is missing; run `keystile migrate`")
            return bytes(row[0])

        return await self._run("server_secret", query, read=True)
