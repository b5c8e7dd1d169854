"""Database fixtures: a real PostgreSQL, and a fresh database per test session.

By default the suite starts the embedded PostgreSQL (as `make run` does) in a temporary folder;
KEYSTILE_TEST_DATABASE_URL points it at any other server instead. Either way the tests create
their own databases (``keystile_test_<random>``) and drop them afterwards, so they never touch
data they did not make.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from keystile_server.embedded import EmbeddedPostgres

TEST_DATABASE_ENV = "KEYSTILE_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A connection URL for a PostgreSQL server the tests may create databases on."""
    external = os.environ.get(TEST_DATABASE_ENV)
    if external:
        yield external
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("embedded"))
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop()


def database_conninfo(server_url: str, dbname: str) -> str:
    """The same server, another database."""
    return make_conninfo(server_url, dbname=dbname)


def conninfo_host_port(conninfo: str) -> tuple[str, int]:
    """Where the server listens: a host name, or a socket directory for Unix sockets."""
    params = conninfo_to_dict(conninfo)
    return str(params.get("host") or "/var/run/postgresql"), int(params.get("port") or 5432)


@pytest.fixture(scope="session")
def make_database(pg_server_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases on the test server; all are dropped at the end."""
    created: list[str] = []

    def create() -> str:
        name = f"keystile_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return database_conninfo(pg_server_url, name)

    yield create
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(make_database: Callable[[], str]) -> str:
    """The session's main database; the shared server migrates it on start."""
    return make_database()


class Db:
    """Direct SQL access for assertions about what the server stored."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(sql, params)  # type: ignore[arg-type]

    def scalar(self, sql: str, params: tuple[object, ...] = ()) -> object:
        return self.query(sql, params)[0][0]

    def snapshot(self) -> tuple[object, ...]:
        """Every stored key, credit balance, owner policy and audit event, as it is.

        last_used_time aside: it is written in the background.
        """
        keys = self.query(
            """SELECT id, owner_id, name, prefix, secret_hash, secret_hint, scopes, resources,
                      metadata::text, rate_limit_per_minute, create_time, expire_time,
                      revoke_time, revoke_reason, created_by, limits::text, credit_terms::text,
                      disable_time, replaces, replaced_by, grant_id
                 FROM keystile.keys ORDER BY id"""
        )
        audit = self.scalar("SELECT count(*) FROM keystile.audit_events")
        credits = self.query("SELECT key_id, remaining FROM keystile.key_credits ORDER BY key_id")
        policies = self.query("SELECT owner_id, update_time FROM keystile.owner_policies ORDER BY owner_id")
        return (tuple(keys), tuple(credits), tuple(policies), audit)


@pytest.fixture(scope="session")
def db(database_url: str) -> Db:
    return Db(database_url)


@pytest.fixture
def unchanged(db: Db) -> Iterator[None]:
    """Assert that the test leaves the keys table exactly as it found it."""
    before = db.snapshot()
    yield
    assert db.snapshot() == before, "the keys table changed"


def pg_binary(name: str) -> Path:
    """A PostgreSQL client program new enough for any server we test against (the embedded 18)."""
    from keystile_server.embedded import _import_pgserver

    versions = _import_pgserver().utils.POSTGRES_VERSIONS
    return Path(versions[max(versions)]) / name
