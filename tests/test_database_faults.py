"""A database that stops answering never stalls keystile: every call gets an answer in bounded time.

Faults come from a real TCP proxy between the server and PostgreSQL (tests/fix_proxy.py):
black-holed connections (silent, not closed: a failover or a dropped conntrack entry), a frozen
network (nothing flows, new connections included), and a stopped database (refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import time
from collections.abc import Callable

import grpc
import psycopg
import pytest
from fix_cache import armed_cache
from fix_db import Db
from fix_http import http_get
from fix_proxy import PgProxy
from fix_server import AioLoop, RunningServer, eventually, server_settings
from grpc_health.v1 import health_pb2

import keystile
from keystile._format import generate_key
from keystile.v1 import keys_pb2
from keystile_server.settings import Settings
from keystile_server.store.connections import POOL_CLOSE_WAIT

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DB_TIMEOUT = 1.0
HEALTH_INTERVAL = 0.5
SLACK = 1.0
"""The issue's bound: every call is answered within --db-timeout + 1 s."""


def fault_settings(proxy: PgProxy, **changes: object) -> Settings:
    return server_settings(
        proxy.conninfo, **{"db_timeout": DB_TIMEOUT, "health_check_interval": HEALTH_INTERVAL, **changes}
    )


def uncached_keys(server: RunningServer, owner: str, n: int) -> list[str]:
    """Secrets of ``n`` real keys that no cache holds yet: verifying one needs the database.

    (Unknown keys would not do: the key filter answers them without the database.) Returns once
    the server has heard every creation event, so that the fault cannot swallow one.
    """
    eventually(lambda: server.metrics()["keystile_key_listener_up"] == 1)  # events flow from here
    events = server.metrics()["keystile_key_events_total"]
    with server.client() as client:
        secrets_ = [client.create_key(owner, f"uncached {i}").secret for i in range(n)]
    eventually(lambda: server.metrics()["keystile_key_events_total"] >= events + n)
    return secrets_


def timed_verifications(address: str, keys: list[str]) -> list[tuple[float, str]]:
    """Verify ``keys`` all at once; each call's seconds and outcome (a result name or an error reason)."""

    def one(key: str) -> tuple[float, str]:
        started = time.monotonic()
        with keystile.Client(address, timeout=30) as client:
            try:
                outcome = keys_pb2.VerifyResult.Name(client.verify_key(key).result)
            except keystile.KeystileError as exc:
                outcome = f"{exc.code.name}:{exc.reason}"
        return time.monotonic() - started, outcome

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        return list(pool.map(one, keys))


def test_black_holed_connections_answer_every_miss_in_bounded_time_and_flip_health(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    running = start_server(fault_settings(pg_proxy, pool_min_size=2, pool_max_size=4))
    with running.client() as client:
        created = client.create_key(owner, "real")
    keys = uncached_keys(running, owner, 21)
    pg_proxy.freeze()  # every connection silent, new ones too: nothing can answer
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        misses = pool.submit(timed_verifications, running.address, keys[:20])
        took = eventually(lambda: running.health() == NOT_SERVING, timeout=10, interval=0.02)
        assert took < 2 * HEALTH_INTERVAL + 0.5, took
        for seconds, outcome in misses.result():
            assert seconds < DB_TIMEOUT + SLACK, (seconds, outcome)
            assert outcome.startswith("UNAVAILABLE"), outcome
    # Known down: later calls fail at once instead of each waiting out the timeout.
    seconds, outcome = timed_verifications(running.address, keys[20:])[0]
    assert outcome == "UNAVAILABLE:DATABASE_UNAVAILABLE" and seconds < 0.5

    pg_proxy.thaw()
    cleared = time.monotonic()
    with running.client(timeout=5) as client:
        eventually(lambda: _valid(client, created.secret), timeout=5, interval=0.05)
    assert time.monotonic() - cleared < 2.0 + SLACK
    eventually(lambda: running.health() == SERVING, timeout=5)
    running.stop()


def _valid(client: keystile.Client, secret: str) -> bool:
    try:
        return client.verify_key(secret).result == keys_pb2.VERIFY_RESULT_VALID
    except keystile.UnavailableError:
        return False


def test_a_silent_connection_is_discarded_and_a_fresh_one_answers(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    """Only the open connections are black-holed: keystile drops them and reconnects by itself."""
    running = start_server(fault_settings(pg_proxy, pool_min_size=1, pool_max_size=4))
    with running.client() as client:
        created = client.create_key(owner, "survivor")
    keys = uncached_keys(running, owner, 5)
    pg_proxy.blackhole_existing()
    results = timed_verifications(running.address, keys)
    assert all(seconds < DB_TIMEOUT + SLACK for seconds, _ in results), results
    # Health saw the stall; fresh connections then answer, with no restart and no operator.
    with running.client(timeout=5) as client:
        eventually(lambda: _valid(client, created.secret), timeout=DB_TIMEOUT + 2 * HEALTH_INTERVAL + 3)
    eventually(lambda: running.health() == SERVING, timeout=5)
    pg_proxy.release_blackhole()
    running.stop()


def test_one_stuck_lookup_does_not_hold_up_the_next(aio: AioLoop) -> None:
    """A load that has not answered in STALLED_LOAD seconds no longer holds the queue behind it."""
    from keystile_server.cache import STALLED_LOAD

    stuck, other = hashlib.sha256(b"stuck").digest(), hashlib.sha256(b"other").digest()

    async def scenario() -> tuple[list[list[bytes]], float, bool]:
        never = asyncio.Event()
        loads: list[list[bytes]] = []

        async def load(hashes: list[bytes]) -> dict[bytes, object]:
            loads.append(list(hashes))
            if stuck in hashes:
                await never.wait()  # a statement on a silent connection
            return {}

        cache = armed_cache(load)
        first = asyncio.create_task(cache.get(stuck))
        await asyncio.sleep(STALLED_LOAD * 2)
        started = time.monotonic()
        async with asyncio.timeout(5):
            await cache.get(other)
        answered_in = time.monotonic() - started
        still_stuck = not first.done()
        first.cancel()
        return loads, answered_in, still_stuck

    loads, answered_in, still_stuck = aio.run(scenario())
    assert loads == [[stuck], [other]], "the second miss left in a load of its own"
    assert still_stuck
    assert answered_in < 1.0, answered_in


def test_waiting_lookups_are_bounded_and_the_rest_refused_at_once(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    running = start_server(fault_settings(pg_proxy, max_pending_lookups=5, health_check_interval=30))
    keys = uncached_keys(running, owner, 30)
    pg_proxy.freeze()
    results = timed_verifications(running.address, keys)
    overloaded = [seconds for seconds, outcome in results if outcome == "UNAVAILABLE:LOOKUPS_OVERLOADED"]
    waited = [seconds for seconds, outcome in results if outcome == "UNAVAILABLE:DATABASE_UNAVAILABLE"]
    assert len(overloaded) + len(waited) == 30, results
    assert overloaded and len(waited) >= 1
    assert max(overloaded) < 0.5, "a refused lookup is refused at once, not queued"
    assert max(waited) < DB_TIMEOUT + SLACK
    pg_proxy.thaw()
    running.stop()


def test_a_stopped_database_is_unavailable_fast_after_the_first_failure(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    running = start_server(fault_settings(pg_proxy))
    with running.client() as client:
        created = client.create_key(owner, "outlives the outage")
    keys = uncached_keys(running, owner, 11)
    pg_proxy.cut()  # refused, like a stopped PostgreSQL
    first = timed_verifications(running.address, keys[:1])[0]
    assert first[1].startswith("UNAVAILABLE") and first[0] < DB_TIMEOUT + SLACK
    eventually(lambda: running.health() == NOT_SERVING, timeout=5)
    for seconds, outcome in timed_verifications(running.address, keys[1:]):
        assert outcome == "UNAVAILABLE:DATABASE_UNAVAILABLE" and seconds < 1.0, (seconds, outcome)
    with running.client() as client, pytest.raises(keystile.UnavailableError):
        client.get_key(created.key.id)

    pg_proxy.restore()
    restored = time.monotonic()
    with running.client(timeout=5) as client:
        eventually(lambda: _valid(client, created.secret), timeout=5, interval=0.05)
    assert time.monotonic() - restored < 2.0 + SLACK
    running.stop()


@pytest.mark.parametrize("mode", ["fail-closed", "serve-cached"])
def test_outage_mode_decides_whether_cached_keys_are_served(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str, mode: str
) -> None:
    running = start_server(fault_settings(pg_proxy, on_database_outage=mode, max_staleness=3.0))
    with running.client() as client:
        cached = client.create_key(owner, "cached").secret
        uncached = client.create_key(owner, "never verified").secret
        time.sleep(0.3)  # let the creations' events pass: a load racing an event is not stored
        loaded = time.monotonic()
        hits = running.metrics()["keystile_cache_lookups_total{outcome=hit}"]
        for _ in range(2):
            assert client.verify_key(cached).result == keys_pb2.VERIFY_RESULT_VALID
        assert running.metrics()["keystile_cache_lookups_total{outcome=hit}"] == hits + 1
    pg_proxy.cut()
    eventually(lambda: running.metrics()["keystile_key_listener_up"] == 0, timeout=5)
    with running.client(timeout=5) as client:
        if mode == "serve-cached":
            assert client.verify_key(cached).result == keys_pb2.VERIFY_RESULT_VALID
        else:
            with pytest.raises(keystile.UnavailableError):
                client.verify_key(cached)
        # Never NOT_FOUND for what the database might hold: UNAVAILABLE in either mode.
        for key in (uncached, generate_key("ks")):
            with pytest.raises(keystile.UnavailableError):
                client.verify_key(key)
        # Never beyond --max-staleness from when it was loaded, whatever the mode.
        time.sleep(max(0.0, 3.0 - (time.monotonic() - loaded)) + 0.1)
        with pytest.raises(keystile.UnavailableError):
            client.verify_key(cached)
    pg_proxy.restore()
    with running.client(timeout=5) as client:
        eventually(lambda: _valid(client, cached), timeout=5, interval=0.05)
    running.stop()


def test_management_calls_are_bounded_too(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    running = start_server(fault_settings(pg_proxy, health_check_interval=30))
    with running.client() as client:
        created = client.create_key(owner, "managed")
    pg_proxy.freeze()
    with running.client(timeout=30) as client:
        for call in (
            lambda: client.get_key(created.key.id),
            lambda: client.list_keys(owner),
            lambda: client.create_key(owner, "during the freeze"),
            lambda: client.revoke_key(created.key.id),
            lambda: client.update_key(created.key.id, name="during the freeze", disabled=True),
            lambda: client.roll_key(created.key.id, grace_period=60),
            lambda: client.revoke_keys(created.key.id),
            lambda: client.delete_key(created.key.id),
            lambda: client.list_audit_events(owner_id=owner),
            lambda: client.import_keys(
                [keys_pb2.ImportedKey(secret_hash="ab" * 32, owner_id=owner, name="during the freeze")]
            ),
        ):
            started = time.monotonic()
            with pytest.raises(keystile.UnavailableError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < DB_TIMEOUT + SLACK
    pg_proxy.thaw()
    # Nothing half-done: each change was one transaction, and none committed.
    with running.client(timeout=30) as client:
        eventually(lambda: _answers(client, created.key.id), timeout=10)
        key = client.get_key(created.key.id)
        assert (key.name, key.disabled, key.state, key.replaced_by) == ("managed", False, 1, "")
        assert [e.action for e in client.list_audit_events(key_id=created.key.id).events] == ["key.create"]
    running.stop()


def _answers(client: keystile.Client, key_id: str) -> bool:
    try:
        client.get_key(key_id)
    except keystile.UnavailableError:
        return False
    return True


def test_stuck_lookups_in_flight_are_capped(aio: AioLoop) -> None:
    """However many loads stall, at most MAX_CONCURRENT_LOADS run; later misses queue (bounded)."""
    from keystile_server.cache import MAX_CONCURRENT_LOADS, STALLED_LOAD

    async def scenario() -> tuple[int, int]:
        never = asyncio.Event()
        loads: list[list[bytes]] = []

        async def load(hashes: list[bytes]) -> dict[bytes, object]:
            loads.append(list(hashes))
            await never.wait()
            return {}

        cache = armed_cache(load)
        waiting = []
        for i in range(MAX_CONCURRENT_LOADS + 3):
            waiting.append(asyncio.create_task(cache.get(hashlib.sha256(bytes([i])).digest())))
            await asyncio.sleep(STALLED_LOAD * 2)
        started = len(loads)
        never.set()  # the statements answer at last: every miss is settled
        await asyncio.gather(*waiting)
        return started, len(waiting)

    started, misses = aio.run(scenario())
    assert started == MAX_CONCURRENT_LOADS < misses


def test_a_slow_statement_fails_alone_and_is_no_outage(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str, db: Db
) -> None:
    """A statement PostgreSQL cancels (here: waiting on a row lock) is UNAVAILABLE for its caller only."""
    running = start_server(fault_settings(pg_proxy, health_check_interval=0.2))
    with running.client() as client:
        locked = client.create_key(owner, "locked by someone else")
        other = client.create_key(owner, "free").secret
    with psycopg.connect(db.conninfo) as holder:
        holder.execute("SELECT 1 FROM keystile.keys WHERE id = %s FOR UPDATE", (locked.key.id,))
        with running.client(timeout=10) as client:
            started = time.monotonic()
            with pytest.raises(keystile.UnavailableError):
                client.revoke_key(locked.key.id)
            assert time.monotonic() - started < DB_TIMEOUT + SLACK
            # Everything else goes on: no outage was declared for a slow statement.
            assert client.verify_key(other).result == keys_pb2.VERIFY_RESULT_VALID
            assert running.health() == SERVING
        holder.rollback()
    with running.client() as client:
        assert client.revoke_key(locked.key.id).state == keys_pb2.KEY_STATE_REVOKED
    running.stop()


def test_leased_units_are_spent_then_unavailable_while_the_database_is_down(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str, database_url: str
) -> None:
    running = start_server(fault_settings(pg_proxy, on_database_outage="serve-cached", max_staleness=30.0))
    with running.client() as client:
        secret = client.create_key(owner, "limited", limits=[keystile.rate_limit("w", 1000, 60)]).secret
        time.sleep(0.3)  # let the creation's event pass, so that the key is cached
        before = [client.verify_key(secret).result for _ in range(200)]  # the process leases ahead
    assert before.count(keys_pb2.VERIFY_RESULT_VALID) == 200
    leased = int(Db(database_url).scalar("SELECT sum(used) FROM keystile.usage_slots"))  # type: ignore[arg-type]
    pg_proxy.cut()
    outcomes: list[str] = []
    with running.client(timeout=5) as client:
        for _ in range(100):
            try:
                outcomes.append(keys_pb2.VerifyResult.Name(client.verify_key(secret).result))
            except keystile.UnavailableError:
                outcomes.append("UNAVAILABLE")
    pg_proxy.restore()
    valid = outcomes.count("VERIFY_RESULT_VALID")
    # The units in hand, and not one more; then UNAVAILABLE, never a refusal or NOT_FOUND.
    assert 0 < valid <= leased - 200
    assert set(outcomes) <= {"VERIFY_RESULT_VALID", "UNAVAILABLE"}
    assert outcomes[-1] == "UNAVAILABLE"
    assert outcomes == sorted(outcomes, key=lambda o: o != "VERIFY_RESULT_VALID")
    running.stop()


def test_a_shutdown_is_not_swallowed_while_a_severed_statement_is_collected(aio: AioLoop) -> None:
    """Cancelling a task that is collecting a severed statement cancels it; it does not run on."""
    from keystile_server.store.connections import _collect

    async def scenario() -> bool:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def loop_like_the_health_check() -> None:
            while True:  # only a cancellation ends this
                await _collect(never)

        task = asyncio.ensure_future(loop_like_the_health_check())
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            async with asyncio.timeout(2):
                await task
        except asyncio.CancelledError:
            return never.cancelled()
        return False

    assert aio.run(scenario())


def test_a_stop_with_calls_hung_on_the_database_ends_within_the_shutdown_grace(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str
) -> None:
    """SIGTERM while the database hangs: in-flight calls are cut at --shutdown-grace, not awaited.

    Before, stop() waited for forward-auth requests as long as aiohttp's default (a minute) and
    for the LISTEN connection's ping for ever: a SIGTERM during an outage never finished.
    """
    grace = 1.0
    running = start_server(
        fault_settings(pg_proxy, db_timeout=20.0, shutdown_grace=grace, http_listen="127.0.0.1:0")
    )
    keys = uncached_keys(running, owner, 4)
    pg_proxy.freeze()
    port = running.server.http_port

    def forward_auth(key: str) -> str:
        try:
            return str(http_get(port, "/auth", {"x-api-key": key})[0])
        except OSError as error:  # the connection closed under the request
            return type(error).__name__

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        verifying = pool.submit(timed_verifications, running.address, keys[:2])
        authorizing = [pool.submit(forward_auth, key) for key in keys[2:]]
        time.sleep(1.0)  # every call is waiting on the frozen database by now
        started = time.monotonic()
        running.stop()
        stopped_in = time.monotonic() - started
        outcomes = [outcome for _, outcome in verifying.result(10)] + [f.result(10) for f in authorizing]
    pg_proxy.thaw()
    # Cut (gRPC's UNAVAILABLE for a server going away, a closed connection), never let through.
    assert len(outcomes) == 4 and not any(o in ("VALID", "200") for o in outcomes), outcomes
    assert stopped_in < grace + POOL_CLOSE_WAIT + 2 * SLACK, f"stop() took {stopped_in:.1f}s"
