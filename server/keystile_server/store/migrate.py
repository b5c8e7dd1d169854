"""Schema migrations: numbered SQL files applied once, in order, under an advisory lock.

Every server runs this at start-up (and ``keystile migrate`` runs it by hand). The session-level
advisory lock makes concurrent starters queue: the first applies what is missing, the rest find
nothing left to do. Each file runs in its own transaction with its version row, so a failed file
leaves no half-applied schema behind. Files are forward-only and never edited once shipped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_log = logging.getLogger(__name__)

# Any constant works as long as it is ours alone; this is "keystile" in ASCII, truncated to 63 bits.
MIGRATION_LOCK_ID: Final = 0x6B657973_74696C65 & 0x7FFFFFFFFFFFFFFF
CONNECT_TIMEOUT: Final = 10
_FILE_RE: Final = re.compile(r"\A(\d{4})_([a-z0-9_]+)\.sql\Z")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file shipped in the package."""

    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Every migration file in the package, in version order."""
    found = []
    for entry in resources.files("keystile_server.store.migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migration files share a version number")
    return found


async def migrate(conninfo: str) -> list[int]:
    """Apply every missing migration; return the versions this call applied (often none)."""
    # Connecting is bounded (an unreachable host fails in seconds, not minutes); the migration
    # itself is not: a large ALTER may take as long as it takes.
    params = conninfo_to_dict(conninfo)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    async with await psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        try:
            return await _apply_missing(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))


async def _apply_missing(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    await conn.execute("CREATE SCHEMA IF NOT EXISTS keystile")
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS keystile.schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    cur = await conn.execute("SELECT version FROM keystile.schema_migrations")
    applied = {int(str(row[0])) for row in await cur.fetchall()}
    known = available_migrations()
    unknown = applied - {m.version for m in known}
    if unknown:
        # A newer keystile migrated this database; running older code against it is unsafe.
        raise RuntimeError(f"database has migrations this keystile does not know: {sorted(unknown)}")
    done = []
    for migration in known:
        if migration.version in applied:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql.encode("utf-8"))
            await conn.execute(
                "INSERT INTO keystile.schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        _log.info("applied migration %04d_%s", migration.version, migration.name)
        done.append(migration.version)
    return done
