"""What reaches the database: hashes not secrets, and migrations applied exactly once."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import psycopg
import pytest
from fix_db import pg_binary

import keystile
from keystile_server.store import migrate
from keystile_server.store.migrate import available_migrations


def test_database_dump_contains_no_secret(client: keystile.Client, owner: str, database_url: str) -> None:
    secrets = [
        client.create_key(owner, f"k{i}", prefix=prefix, scopes=["jobs:read"], metadata={"n": i}).secret
        for i, prefix in enumerate(["ks", "sk_live", "pk_test"] * 4)
    ]
    for secret in secrets[:3]:
        assert client.verify_key(secret).result == keystile.VerifyResult.Value("VERIFY_RESULT_VALID")
    dump = subprocess.run(
        [str(pg_binary("pg_dump")), "--dbname", database_url, "--data-only", "--inserts"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert owner in dump, "the dump should hold the keys we just made"
    for secret in secrets:
        random_part = secret.rsplit("_", 1)[1]
        assert secret not in dump
        assert random_part[:43] not in dump  # not even the random part without prefix/checksum
        assert random_part[8:24] not in dump  # nor any chunk beyond the stored 8-character hint


def _applied(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return [
            (int(v), str(n))
            for v, n in conn.execute(
                "SELECT version, name FROM keystile.schema_migrations ORDER BY version"
            ).fetchall()
        ]


def test_concurrent_migrations_apply_each_version_exactly_once(make_database: Callable[[], str]) -> None:
    url = make_database()

    async def race() -> list[list[int]]:
        return await asyncio.gather(*(migrate(url) for _ in range(4)))

    results = asyncio.run(race())
    versions = [m.version for m in available_migrations()]
    assert sorted(results, key=len)[-1] == versions, "one migrator applied everything"
    assert sum(len(r) for r in results) == len(versions), "nothing was applied twice"
    assert [v for v, _ in _applied(url)] == versions
    assert asyncio.run(migrate(url)) == []  # idempotent afterwards


def test_migrations_are_numbered_and_contiguous() -> None:
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_a_database_from_a_newer_keystile_is_refused(make_database: Callable[[], str]) -> None:
    url = make_database()
    asyncio.run(migrate(url))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO keystile.schema_migrations (version, name) VALUES (9999, 'future')")
    with pytest.raises(RuntimeError, match="9999"):
        asyncio.run(migrate(url))


def test_migrate_command(make_database: Callable[[], str]) -> None:
    from fix_server import run_cli

    url = make_database()
    first = run_cli("migrate", "--database-url", url)
    assert first.returncode == 0, first.stderr
    assert "applied migrations: 1" in first.stdout
    second = run_cli("migrate", "--database-url", url)
    assert second.returncode == 0 and "up to date" in second.stdout
