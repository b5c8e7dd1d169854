"""The verification cache: hits cost no query, misses coalesce, events evict, failures fail safe.

Queries are counted from the server's own /metrics (``keystile_db_queries_total``), the counters
an operator sees, so each claim here is about the running server and not about a test hook.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fix_db import Db
from fix_server import AioLoop, RunningServer, eventually, server_settings

import keystile
from keystile import VerifyResult
from keystile_server.cache import VerificationCache
from keystile_server.metrics import ServerMetrics
from keystile_server.store import KeyStore
from keystile_server.store.lifecycle_store import LifecycleStore

LOOKUPS = "keystile_db_queries_total{op=find_by_hashes}"
HITS = "keystile_cache_lookups_total{outcome=hit}"
VALID = VerifyResult.VERIFY_RESULT_VALID
REVOKED = VerifyResult.VERIFY_RESULT_REVOKED
NOT_FOUND = VerifyResult.VERIFY_RESULT_NOT_FOUND
LISTENERS = "application_name = 'keystile-listener' AND datname = current_database()"


@pytest.fixture(scope="module")
def cache_db(module_db_url: str) -> Db:
    return Db(module_db_url)


def new_key(
    server: RunningServer, client: keystile.Client, owner: str, **options: Any
) -> keystile.v1.keys_pb2.CreateKeyResponse:
    """Create a key and wait for the server to hear of it: the insert's event evicts that hash,
    and a test counting lookups must not have it land after the key was first cached."""
    events = server.metrics()["keystile_key_events_total"]
    options.setdefault("scopes", ["jobs:read"])
    created = client.create_key(owner, "cached", **options)
    eventually(lambda: server.metrics()["keystile_key_events_total"] > events)
    return created


def unknown_key() -> str:
    return keystile.generate_key("ks")


@pytest.mark.parametrize("verify_auth", ["open", "required"])
def test_a_cached_key_costs_no_query(
    fresh: Callable[..., RunningServer], owner: str, verify_auth: str
) -> None:
    server = fresh(verify_auth=verify_auth)
    # The static admin: with --verify-auth required, a caller that needs no lookup itself.
    with server.client() as client:
        secret = new_key(server, client, owner).secret
        assert client.verify_key(secret).result == VALID
        before = server.metrics()
        for _ in range(50):
            assert client.verify_key(secret, required_scopes=["jobs:read"]).result == VALID
        after = server.metrics()
    assert after[LOOKUPS] - before[LOOKUPS] == 0
    assert after[HITS] - before[HITS] == 50


def test_a_thousand_concurrent_verifications_of_one_uncached_key_cost_one_query(
    fresh: Callable[..., RunningServer], aio: AioLoop, owner: str
) -> None:
    server = fresh()
    with server.client() as client:
        secret = new_key(server, client, owner).secret
    before = server.metrics()

    async def verify_all() -> list[int]:
        async with keystile.AsyncClient(server.address) as client:
            responses = await asyncio.gather(*(client.verify_key(secret) for _ in range(1000)))
        return [response.result for response in responses]

    assert aio.run(verify_all()) == [VALID] * 1000
    after = server.metrics()
    assert after[LOOKUPS] - before[LOOKUPS] == 1
    assert (
        after["keystile_verifications_total{result=valid}"]
        - before["keystile_verifications_total{result=valid}"]
        == 1000
    )


def test_concurrent_misses_for_different_keys_share_batched_queries(
    fresh: Callable[..., RunningServer], aio: AioLoop, owner: str
) -> None:
    server = fresh()
    with server.client() as client:
        secrets_ = [new_key(server, client, owner).secret for _ in range(20)] + [
            unknown_key() for _ in range(20)
        ]
    before = server.metrics()

    async def verify_all() -> list[int]:
        async with keystile.AsyncClient(server.address) as client:
            responses = await asyncio.gather(*(client.verify_key(s) for s in secrets_))
        return [response.result for response in responses]

    assert aio.run(verify_all()) == [VALID] * 20 + [NOT_FOUND] * 20
    after = server.metrics()
    # Every miss of a real key went through a batched lookup; how many share one depends on how
    # they arrive. The unknown ones never reached the database: the key filter answered them.
    assert 1 <= after[LOOKUPS] - before[LOOKUPS] <= 20
    assert after["keystile_lookup_batch_keys_sum"] - before["keystile_lookup_batch_keys_sum"] == 20
    filtered = "keystile_cache_lookups_total{outcome=filtered}"
    assert after[filtered] - before[filtered] == 20


def test_misses_queued_behind_a_slow_load_leave_as_one_query(
    aio: AioLoop, module_db_url: str, owner: str
) -> None:
    """With the loads in flight, a hundred new misses wait and then share a single query."""
    secrets_ = [unknown_key() for _ in range(100)]

    async def storm() -> list[int]:
        pool = KeyStore.create_pool(module_db_url, min_size=1, max_size=4, timeout=5)
        await pool.open(wait=True)
        try:
            store = KeyStore(pool)
            gate = asyncio.Event()
            batches: list[int] = []

            async def gated_load(hashes: list[bytes]) -> dict[bytes, object]:
                batches.append(len(hashes))
                await gate.wait()
                return await store.find_by_hashes(hashes)  # type: ignore[return-value]

            cache = VerificationCache(
                gated_load,  # type: ignore[arg-type]
                max_entries=10,
                negative_max_entries=1000,
                max_staleness=60,
                metrics=ServerMetrics(),
            )
            cache.arm()
            blocker = asyncio.create_task(cache.get(hashlib.sha256(b"first").digest()))
            for _ in range(3):  # the first load starts and blocks
                await asyncio.sleep(0)
            storm = [asyncio.create_task(cache.get(hashlib.sha256(s.encode()).digest())) for s in secrets_]
            await asyncio.sleep(0.05)
            gate.set()
            assert await asyncio.gather(blocker, *storm) == [None] * 101
            return batches
        finally:
            await pool.close()

    assert aio.run(storm()) == [1, 100]


def test_an_unknown_key_is_looked_up_once_then_remembered(fresh: Callable[..., RunningServer]) -> None:
    server = fresh(key_filter=False)  # the negative cache alone (it also catches filter false positives)
    secret = unknown_key()
    before = server.metrics()
    with server.client() as client:
        for _ in range(30):
            assert client.verify_key(secret).result == NOT_FOUND
    after = server.metrics()
    assert after[LOOKUPS] - before[LOOKUPS] == 1
    assert after["keystile_cache_lookups_total{outcome=negative_hit}"] == 29


def test_a_key_created_later_evicts_its_negative_entry(
    fresh: Callable[..., RunningServer], cache_db: Db
) -> None:
    """The insert's NOTIFY evicts the remembered absence, so a new key works at once everywhere."""
    server = fresh()
    secret = unknown_key()
    with server.client() as client:
        assert client.verify_key(secret).result == NOT_FOUND
        cache_db.execute(
            """INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint)
               VALUES (%s, 'team-late', 'late', 'ks', %s, 'ks_late')""",
            (uuid.uuid4(), hashlib.sha256(secret.encode()).digest()),
        )
        eventually(lambda: client.verify_key(secret).result == VALID, timeout=2)


def test_the_negative_cache_is_bounded(fresh: Callable[..., RunningServer]) -> None:
    server = fresh(negative_cache_max_entries=5, key_filter=False)
    unknown = [unknown_key() for _ in range(8)]
    with server.client() as client:
        for secret in unknown:
            assert client.verify_key(secret).result == NOT_FOUND
        metrics = server.metrics()
        assert metrics["keystile_cache_evictions_total{reason=capacity}"] == 3
        # The oldest three were pushed out: asking again costs a query; the newest five do not.
        for secret in unknown[3:]:
            client.verify_key(secret)
        assert server.metrics()[LOOKUPS] == metrics[LOOKUPS]
        client.verify_key(unknown[0])
        assert server.metrics()[LOOKUPS] == metrics[LOOKUPS] + 1


def test_the_positive_cache_is_bounded_least_recently_used_first(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    server = fresh(cache_max_entries=2)
    with server.client() as client:
        a, b, c = (new_key(server, client, owner).secret for _ in range(3))
        for secret in (a, b, a, c):  # c pushes out b, the least recently used
            assert client.verify_key(secret).result == VALID
        before = server.metrics()
        client.verify_key(a)
        client.verify_key(c)
        assert server.metrics()[LOOKUPS] == before[LOOKUPS]
        client.verify_key(b)
        assert server.metrics()[LOOKUPS] == before[LOOKUPS] + 1
    assert before["keystile_cache_evictions_total{reason=capacity}"] == 1


def test_no_entry_is_served_older_than_max_staleness(fresh: Callable[..., RunningServer], owner: str) -> None:
    server = fresh(max_staleness=0.3)
    with server.client() as client:
        secret = new_key(server, client, owner).secret
        client.verify_key(secret)
        before = server.metrics()
        eventually(
            lambda: (client.verify_key(secret), server.metrics()[LOOKUPS] > before[LOOKUPS])[1], 3, 0.05
        )
        assert server.metrics()["keystile_cache_evictions_total{reason=expired}"] >= 1


def test_a_cached_valid_verdict_ends_at_the_keys_expire_time(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    """Cache hits reuse the verdict judged for the snapshot; that reuse must stop at expiry."""
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner, ttl=timedelta(seconds=3))
        expire_time = created.key.expire_time.ToDatetime(tzinfo=UTC)
        for _ in range(5):
            assert client.verify_key(created.secret).result == VALID
        before = server.metrics()
        time.sleep(max(0.0, (expire_time - datetime.now(UTC)).total_seconds()) + 0.05)
        response = client.verify_key(created.secret)
        after = server.metrics()
    assert response.result == VerifyResult.VERIFY_RESULT_EXPIRED
    assert response.key.state == keystile.v1.keys_pb2.KEY_STATE_EXPIRED
    assert after[LOOKUPS] == before[LOOKUPS], "judged again from the cached snapshot, not reloaded"
    assert after[HITS] > before[HITS]


def test_cached_verdicts_answer_each_scope_and_resource_request_on_its_own(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    server = fresh()
    cases = [
        ([], "", VALID),
        (["jobs:read"], "", VALID),
        (["jobs:write"], "", VerifyResult.VERIFY_RESULT_INSUFFICIENT_SCOPE),
        (["jobs:read"], "payroll", VerifyResult.VERIFY_RESULT_FORBIDDEN_RESOURCE),
        ([], "invoices", VALID),
        (["jobs:read", "jobs:write"], "invoices", VerifyResult.VERIFY_RESULT_INSUFFICIENT_SCOPE),
    ]
    with server.client() as client:
        created = new_key(server, client, owner, resources=["invoices"])
        client.verify_key(created.secret)
        before = server.metrics()
        for _ in range(3):  # the second and third rounds are answered from memoized verdicts
            for scopes, resource, expected in cases:
                response = client.verify_key(created.secret, required_scopes=scopes, resource=resource)
                assert (response.result, response.key.id) == (expected, created.key.id), (scopes, resource)
            with pytest.raises(keystile.InvalidArgumentError) as info:
                client.verify_key(created.secret, required_scopes=["jobs:read", "BAD"])
            assert "required_scopes[1]" in info.value.field_violations
        after = server.metrics()
    assert after[LOOKUPS] == before[LOOKUPS]
    assert after[HITS] - before[HITS] >= 3 * len(cases)
    verifications = sum(v for k, v in after.items() if k.startswith("keystile_verifications_total{")) - sum(
        v for k, v in before.items() if k.startswith("keystile_verifications_total{")
    )
    assert verifications == 3 * len(cases), "refused requests are not verifications"


def test_a_remembered_unknown_key_with_bad_scopes_is_still_a_bad_request(
    fresh: Callable[..., RunningServer],
) -> None:
    server = fresh(key_filter=False)
    secret = unknown_key()
    with server.client() as client:
        assert client.verify_key(secret).result == NOT_FOUND  # looked up once, now remembered
        before = server.metrics()
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.verify_key(secret, required_scopes=["jobs:read", "BAD"])
        assert "required_scopes[1]" in info.value.field_violations
        assert client.verify_key(secret, required_scopes=["jobs:read"]).result == NOT_FOUND
    after = server.metrics()
    assert (
        after["keystile_cache_lookups_total{outcome=negative_hit}"]
        - before["keystile_cache_lookups_total{outcome=negative_hit}"]
        == 2
    )
    assert after[LOOKUPS] == before[LOOKUPS]


def test_verdicts_memoized_for_one_key_are_bounded_and_leave_with_it(
    fresh: Callable[..., RunningServer], owner: str, cache_db: Db
) -> None:
    """A caller varying its scopes without end cannot grow one entry's memo without end, and a
    revocation takes every verdict memoized for the key with it."""
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner, scopes=["jobs:*"])
        cache = server.server._cache
        assert cache is not None
        for i in range(100):
            assert client.verify_key(created.secret, required_scopes=[f"jobs:task{i}"]).result == VALID
        entry = cache._positive[keystile.hash_key(created.secret)]
        assert 0 < len(entry.verdicts) <= 8
        cache_db.execute("UPDATE keystile.keys SET revoke_time = now() WHERE id = %s", (created.key.id,))
        eventually(lambda: keystile.hash_key(created.secret) not in cache._positive)
        for i in range(100):  # every memoized scope set answers afresh
            assert client.verify_key(created.secret, required_scopes=[f"jobs:task{i}"]).result == REVOKED


def test_malformed_keys_cost_no_query_and_no_cache_entry(fresh: Callable[..., RunningServer]) -> None:
    server = fresh()
    before = server.metrics()
    with server.client() as client:
        for junk in ("", "ks_short", "nope", unknown_key()[:-1] + "!"):
            assert client.verify_key(junk).result == VerifyResult.VERIFY_RESULT_MALFORMED
    after = server.metrics()
    assert after[LOOKUPS] == before[LOOKUPS]
    assert (
        after["keystile_cache_lookups_total{outcome=miss}"]
        == before["keystile_cache_lookups_total{outcome=miss}"]
    )


def test_turning_the_cache_off_sends_every_verification_to_the_database(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    server = fresh(cache_max_entries=0)
    with server.client() as client:
        secret = new_key(server, client, owner).secret
        before = server.metrics()
        for _ in range(5):
            assert client.verify_key(secret).result == VALID
    assert server.metrics()[LOOKUPS] - before[LOOKUPS] == 5


def test_a_revocation_made_in_sql_reaches_the_cache_through_notify(
    fresh: Callable[..., RunningServer], cache_db: Db, owner: str
) -> None:
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner)
        assert client.verify_key(created.secret).result == VALID  # now cached
        cache_db.execute("UPDATE keystile.keys SET revoke_time = now() WHERE id = %s", (created.key.id,))
        eventually(lambda: client.verify_key(created.secret).result == REVOKED, timeout=2)
    assert server.metrics()["keystile_key_events_total"] >= 1


def test_a_revocation_through_one_server_is_refused_by_another(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    first, second = fresh(), fresh()
    with first.client() as a, second.client() as b:
        created = new_key(first, a, owner)
        assert a.verify_key(created.secret).result == VALID
        assert b.verify_key(created.secret).result == VALID  # cached in both processes
        a.revoke_key(created.key.id)
        assert a.verify_key(created.secret).result == REVOKED  # evicted locally before returning
        eventually(lambda: b.verify_key(created.secret).result == REVOKED, timeout=2)


def test_a_bulk_change_drops_every_cache_at_once(
    fresh: Callable[..., RunningServer], cache_db: Db, owner: str
) -> None:
    """Over 1000 keys in one statement send a single "*" event rather than one per key."""
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner)
        client.verify_key(created.secret)
        before = server.metrics()
        cache_db.execute(
            """INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint)
               SELECT gen_random_uuid(), 'bulk', 'bulk', 'ks', sha256(('bulk' || i || %s)::bytea), 'ks_bulk'
                 FROM generate_series(1, 1001) AS i""",
            (owner,),
        )
        eventually(
            lambda: (
                server.metrics()["keystile_cache_evictions_total{reason=cleared}"]
                > before["keystile_cache_evictions_total{reason=cleared}"]
            )
        )
        assert server.metrics()["keystile_key_events_total"] == before["keystile_key_events_total"]
        eventually(lambda: server.metrics()["keystile_key_listener_up"] == 1)
        assert client.verify_key(created.secret).result == VALID
        assert client.verify_key(created.secret).result == VALID
    assert server.metrics()[LOOKUPS] == before[LOOKUPS] + 1  # dropped, fetched again, cached again


def test_last_used_writes_are_not_key_events(
    fresh: Callable[..., RunningServer], cache_db: Db, owner: str
) -> None:
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner)
        events = server.metrics()["keystile_key_events_total"]
        client.verify_key(created.secret)
        eventually(
            lambda: (
                cache_db.scalar("SELECT last_used_time FROM keystile.keys WHERE id = %s", (created.key.id,))
                is not None
            )
        )
        assert client.verify_key(created.secret).result == VALID
    assert server.metrics()["keystile_key_events_total"] == events


def _listener_pid(db: Db, exclude: int = 0) -> int | None:
    rows = db.query(
        f"SELECT pid FROM pg_stat_activity WHERE {LISTENERS} AND pid <> %s",
        (exclude,),
    )
    return int(rows[0][0]) if len(rows) == 1 else None  # type: ignore[call-overload]


def test_a_revocation_while_the_listener_is_down_is_never_served_stale(
    fresh: Callable[..., RunningServer], cache_db: Db, owner: str
) -> None:
    """Kill the LISTEN backend, revoke meanwhile: the cache must not answer VALID afterwards."""
    server = fresh()
    with server.client() as client:
        created = new_key(server, client, owner)
        assert client.verify_key(created.secret).result == VALID
        assert client.verify_key(created.secret).result == VALID
        assert server.metrics()["keystile_cache_lookups_total{outcome=hit}"] >= 1
        pid = _listener_pid(cache_db)
        assert pid is not None
        # Wait (up to 5 s) for the backend to be gone, then revoke before anyone could re-LISTEN...
        cache_db.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        cache_db.execute("UPDATE keystile.keys SET revoke_time = now() WHERE id = %s", (created.key.id,))
        # ...so no event for this revocation reaches the server, and yet it is refused at once.
        assert client.verify_key(created.secret).result == REVOKED
        # The listener comes back on a new backend and the cache serves again.
        eventually(lambda: _listener_pid(cache_db, exclude=pid) is not None)
        eventually(lambda: server.metrics()["keystile_key_listener_up"] == 1)
        hits = server.metrics()["keystile_cache_lookups_total{outcome=hit}"]
        assert client.verify_key(created.secret).result == REVOKED
        assert client.verify_key(created.secret).result == REVOKED
        assert server.metrics()["keystile_cache_lookups_total{outcome=hit}"] > hits
    assert server.metrics()["keystile_cache_evictions_total{reason=cleared}"] >= 1


def test_a_silently_dead_network_disarms_the_cache_and_fails_closed(
    start_server: Callable[..., RunningServer], module_db_url: str, owner: str
) -> None:
    """No FIN, no error: the listener's ping must notice, and nothing cached may be served."""
    from fix_proxy import PgProxy

    proxy = PgProxy(module_db_url)
    server = start_server(server_settings(proxy.conninfo, db_timeout=1.0, health_check_interval=0.2))
    try:
        eventually(lambda: server.metrics()["keystile_key_listener_up"] == 1)
        with server.client(timeout=10) as client:
            created = new_key(server, client, owner)
            assert client.verify_key(created.secret).result == VALID
            assert client.verify_key(created.secret).result == VALID  # served from the cache
            proxy.freeze()
            # Within a ping interval plus the timeout the listener gives up and the cache is off.
            eventually(lambda: server.metrics()["keystile_key_listener_up"] == 0, timeout=5)
            # The key is no longer answered from memory: with the database unreachable the
            # answer is UNAVAILABLE, never a cached VALID that could be stale.
            with pytest.raises(keystile.UnavailableError):
                client.verify_key(created.secret)
            proxy.thaw()
            eventually(lambda: server.metrics()["keystile_key_listener_up"] == 1, timeout=15)
            # The pool's outage ends with the next probe (every 0.5 s while down).
            eventually(lambda: server.health() == 1, timeout=5)
            assert client.verify_key(created.secret).result == VALID
    finally:
        server.stop()
        proxy.close()


def test_a_fill_racing_a_revocation_is_not_stored(
    aio: AioLoop, database_url: str, client: keystile.Client, owner: str
) -> None:
    """A lookup that read the row before the revocation committed must not be cached after it."""
    created = client.create_key(owner, "racing", scopes=["jobs:read"])
    secret_hash = hashlib.sha256(created.secret.encode()).digest()

    async def race() -> tuple[bool, bool, bool, float]:
        pool = KeyStore.create_pool(database_url, min_size=1, max_size=2, timeout=5)
        await pool.open(wait=True)
        try:
            store = KeyStore(pool)
            gate = asyncio.Event()
            read = asyncio.Event()

            async def slow_load(hashes: list[bytes]) -> dict[bytes, object]:
                found = await store.find_by_hashes(hashes)  # reads the row as it is now...
                read.set()
                await gate.wait()  # ...and is slow to come back
                return found  # type: ignore[return-value]

            metrics = ServerMetrics()
            cache = VerificationCache(
                slow_load,
                max_entries=10,
                negative_max_entries=10,
                max_staleness=60,
                metrics=metrics,  # type: ignore[arg-type]
            )
            cache.arm()
            early = asyncio.create_task(cache.get(secret_hash))
            await read.wait()  # the early lookup holds the pre-revocation row
            lifecycle = LifecycleStore(store.guard, on_query=store.count_query)
            await lifecycle.revoke_key(created.key.id, "race", owner_id=None, cascade=False, actor="test")
            cache.invalidate(secret_hash)  # what the NOTIFY does on arrival
            late = asyncio.create_task(cache.get(secret_hash))  # must not join the stale load
            await asyncio.sleep(0.05)
            gate.set()
            early_record, late_record = await early, await late
            after = await cache.get(secret_hash)
            assert early_record is not None and late_record is not None and after is not None
            return (
                early_record.revoke_time is None,
                late_record.revoke_time is not None,
                after.revoke_time is not None,
                metrics.registry.get_sample_value("keystile_cache_fills_discarded_total") or 0.0,
            )
        finally:
            await pool.close()

    early_was_active, late_saw_revocation, cached_is_revoked, discarded = aio.run(race())
    assert early_was_active  # answered the request that raced the revocation...
    assert late_saw_revocation  # ...but a lookup after the event started afresh
    assert cached_is_revoked  # and the stale row never made it into the cache
    assert discarded == 1


def test_listener_loss_disarms_and_reconnect_rearms(aio: AioLoop, make_database: Callable[[], str]) -> None:
    """Direct check of the protocol on a real LISTEN connection: up, down, up again."""
    from keystile_server.store.key_events import KeyEventListener

    database_url = make_database()
    log: list[str] = []

    async def scenario() -> None:
        listener = KeyEventListener(
            database_url,
            on_event=lambda h, lag: log.append("event"),
            on_connected=lambda: log.append("up"),
            on_disconnected=lambda: log.append("down"),
            ping_interval=0.2,
            timeout=2,
        )
        task = asyncio.create_task(listener.run())
        try:
            for _ in range(200):
                if log == ["up"]:
                    break
                await asyncio.sleep(0.01)
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(
                    "SELECT pg_notify('keystile_key_events', repeat('ab', 32) || ' ' || "
                    "extract(epoch FROM now())::text)"
                )
                for _ in range(200):
                    if log[-1:] == ["event"]:
                        break
                    await asyncio.sleep(0.01)
                await conn.execute(
                    f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE {LISTENERS}"
                )
            for _ in range(300):
                if log[-2:] == ["down", "up"]:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    aio.run(scenario())
    assert log == ["up", "event", "down", "up"]
