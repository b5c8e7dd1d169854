"""Infrastructure failures: UNAVAILABLE (never a disguised "not found"), INTERNAL, and health."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fix_proxy import PgProxy
from fix_server import RunningServer, server_settings
from grpc_health.v1 import health_pb2

import keystile
from keystile._format import generate_key
from keystile.v1 import keys_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_health(server: RunningServer, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.health() != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.05)


def test_database_outage_is_unavailable_and_health_follows(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    running = start_server(server_settings(pg_proxy.conninfo, db_timeout=1.0))
    with running.client() as client:
        created = client.create_key(owner, "before outage")
        assert running.health() == SERVING
        assert running.health("keystile.v1.KeyService") == SERVING

        pg_proxy.cut()
        _wait_health(running, NOT_SERVING)
        assert running.health("keystile.v1.KeyService") == NOT_SERVING
        calls: dict[str, Callable[[], Any]] = {
            "verify existing": lambda: client.verify_key(created.secret),
            "verify unknown": lambda: client.verify_key(generate_key("ks")),
            "get": lambda: client.get_key(created.key.id),
            "list": lambda: client.list_keys(owner),
            "create": lambda: client.create_key(owner, "during outage"),
            "revoke": lambda: client.revoke_key(created.key.id),
        }
        for name, call in calls.items():
            with pytest.raises(keystile.UnavailableError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, name
            assert info.value.reason == "DATABASE_UNAVAILABLE", name
            assert "psycopg" not in info.value.message and "connection" not in info.value.message.lower()

        # A malformed key needs no database: it is answered even now.
        assert client.verify_key("not-a-key").result == keys_pb2.VERIFY_RESULT_MALFORMED

        pg_proxy.restore()
        _wait_health(running, SERVING)
        assert client.verify_key(created.secret).result == keys_pb2.VERIFY_RESULT_VALID
        assert client.get_key(created.key.id).id == created.key.id
    running.stop()


def test_not_serving_until_database_is_ready(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    pg_proxy.cut()
    running = start_server(server_settings(pg_proxy.conninfo, db_timeout=1.0), wait_ready=False)
    try:
        time.sleep(0.5)
        assert running.health() == NOT_SERVING
        with running.client() as client, pytest.raises(keystile.UnavailableError):
            client.create_key(owner, "too early")
        pg_proxy.restore()
        running.aio.run(running.server.wait_ready(30))
        assert running.health() == SERVING
        with running.client() as client:
            assert client.create_key(owner, "now").key.owner_id == owner
    finally:
        running.stop()


def test_unexpected_database_errors_are_generic_internal(
    start_server: Callable[..., RunningServer], make_database: Callable[[], str], owner: str
) -> None:
    import psycopg

    url = make_database()
    running = start_server(server_settings(url))
    try:
        with running.client() as client:
            uncached = client.create_key(owner, "never verified").secret
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE keystile.keys RENAME COLUMN name TO name_gone")
        with running.client() as client, pytest.raises(keystile.InternalError) as info:
            client.create_key(owner, "boom")
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert info.value.message == "internal error"
        assert info.value.reason == "INTERNAL_ERROR" and info.value.domain == "keystile.dev"
        assert "name" not in info.value.message and "column" not in str(info.value)
        # VerifyKey translates its errors inline (not through the decorator): the same answer.
        with running.client() as client, pytest.raises(keystile.InternalError) as info:
            client.verify_key(uncached)
        assert (info.value.message, info.value.reason) == ("internal error", "INTERNAL_ERROR")
        assert "column" not in str(info.value)
    finally:
        running.stop()
