"""WatchKeyEvents and ``Client(cache=True)``: verdicts from memory, dropped the moment they may lie.

Server-side RPC counts come from the server's /metrics (``keystile_verifications_total``); the
cache's own rules (silence, fencing, expiry) are also checked on ``VerdictCache`` with a
controlled clock, since waiting out real heartbeats would only make the suite slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import grpc
import pytest
from fix_db import Db
from fix_server import AioLoop, RunningServer, eventually
from google.protobuf import duration_pb2

import keystile
from keystile import VerifyResult
from keystile._cache import VerdictCache
from keystile.v1 import keys_pb2, keys_pb2_grpc

VALID = VerifyResult.VERIFY_RESULT_VALID
REVOKED = VerifyResult.VERIFY_RESULT_REVOKED
VERIFIED = "keystile_verifications_total{result=valid}"


@pytest.fixture
def server(fresh: Callable[..., RunningServer]) -> RunningServer:
    return fresh()


def live(client: keystile.Client) -> Callable[[], bool]:
    def check() -> bool:
        stats = client.cache_stats()
        return stats is not None and stats.live

    return check


def heard_key(server: RunningServer, owner: str, name: str) -> keystile.v1.keys_pb2.CreateKeyResponse:
    """Create a key and wait until the server has fanned its creation event out, so that the
    event cannot reach a caching client later and evict a verdict the test is counting."""
    events = server.metrics()["keystile_key_events_total"]
    with server.client() as admin:
        created = admin.create_key(owner, name, scopes=["jobs:read"])
    eventually(lambda: server.metrics()["keystile_key_events_total"] > events)
    return created


def watch(address: str, **fields: object) -> Iterator[keys_pb2.WatchKeyEventsResponse]:
    channel = grpc.insecure_channel(address)
    stub = keys_pb2_grpc.KeyServiceStub(channel)
    return stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(**fields), timeout=10)  # type: ignore[no-any-return]


# --- the RPC ---------------------------------------------------------------------------------


def test_a_stream_opens_with_ready_then_heartbeats(server: RunningServer) -> None:
    stream = watch(server.address, heartbeat_interval=duration_pb2.Duration(seconds=1))
    ready = next(stream)
    assert ready.type == keys_pb2.KEY_EVENT_TYPE_READY
    assert ready.heartbeat_interval.seconds == 1
    assert ready.max_staleness.seconds == 30
    started = time.monotonic()
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_HEARTBEAT
    assert 0.5 < time.monotonic() - started < 3
    stream.cancel()  # type: ignore[attr-defined]


def test_a_change_is_sent_as_the_hash_of_the_secret(server: RunningServer, owner: str) -> None:
    stream = watch(server.address, heartbeat_interval=duration_pb2.Duration(seconds=5))
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    with server.client() as client:
        created = client.create_key(owner, "watched")
        client.revoke_key(created.key.id)
    digest = hashlib.sha256(created.secret.encode()).digest()
    seen: list[bytes] = []
    while seen.count(digest) < 2:  # one for the creation, one for the revocation
        event = next(stream)
        assert event.type == keys_pb2.KEY_EVENT_TYPE_INVALIDATE
        seen.extend(event.key_hashes)
    assert all(len(h) == 32 for h in seen)
    stream.cancel()  # type: ignore[attr-defined]


@pytest.mark.parametrize("seconds", [0, 61])
def test_a_heartbeat_interval_out_of_range_is_refused(server: RunningServer, seconds: int) -> None:
    stream = watch(
        server.address,
        heartbeat_interval=duration_pb2.Duration(seconds=seconds, nanos=1 if seconds == 0 else 0),
    )
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "heartbeat_interval" in caught.value.details()  # type: ignore[attr-defined]


def test_watching_follows_the_verify_access_rule(fresh: Callable[..., RunningServer], owner: str) -> None:
    server = fresh(verify_auth="required")
    with pytest.raises(grpc.RpcError) as caught:
        next(watch(server.address))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with server.client() as admin:
        reader = admin.create_key(owner, "reader", scopes=["keys:read"]).secret
        verifier = admin.create_key(owner, "verifier", scopes=["keys:verify"]).secret
    stub = keys_pb2_grpc.KeyServiceStub(grpc.insecure_channel(server.address))
    refused = stub.WatchKeyEvents(
        keys_pb2.WatchKeyEventsRequest(), metadata=(("authorization", f"Bearer {reader}"),), timeout=5
    )
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    allowed = stub.WatchKeyEvents(
        keys_pb2.WatchKeyEventsRequest(), metadata=(("authorization", f"Bearer {verifier}"),), timeout=5
    )
    assert next(allowed).type == keys_pb2.KEY_EVENT_TYPE_READY
    allowed.cancel()


def test_streams_end_unavailable_when_the_server_stops(fresh: Callable[..., RunningServer]) -> None:
    server = fresh()
    stream = watch(server.address)
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    started = time.monotonic()
    server.stop()
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert time.monotonic() - started < 2  # the stream did not hold up the shutdown grace


def test_streams_end_when_the_servers_listener_is_lost(
    fresh: Callable[..., RunningServer], module_db_url: str
) -> None:
    server = fresh()
    stream = watch(server.address)
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    Db(module_db_url).execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE application_name = 'keystile-listener' AND datname = current_database()"
    )
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "resubscribe" in caught.value.details()  # type: ignore[attr-defined]


# --- the caching client ----------------------------------------------------------------------


def test_cached_verifications_make_no_rpc(server: RunningServer, owner: str) -> None:
    secret = heard_key(server, owner, "hot").secret
    with keystile.Client(server.address, cache=True) as client:
        eventually(live(client))
        before = server.metrics()[VERIFIED]
        for _ in range(200):
            assert client.verify_key(secret, required_scopes=["jobs:read"]).result == VALID
        stats = client.cache_stats()
        assert stats is not None and stats.hits == 199 and stats.misses == 1
        # Another question about the same key is a different verdict: asked once, then cached.
        assert client.verify_key(secret, required_scopes=["jobs:write"]).result == (
            VerifyResult.VERIFY_RESULT_INSUFFICIENT_SCOPE
        )
        assert client.verify_key(secret, required_scopes=["jobs:write"]).result == (
            VerifyResult.VERIFY_RESULT_INSUFFICIENT_SCOPE
        )
    assert server.metrics()[VERIFIED] - before == 1


def test_a_revocation_reaches_sync_and_async_caching_clients(
    server: RunningServer, aio: AioLoop, owner: str
) -> None:
    with server.client() as admin:
        created = admin.create_key(owner, "revoked-soon")

    async def make() -> keystile.AsyncClient:
        return keystile.AsyncClient(server.address, cache=True)  # on the loop it will run on

    async_client = aio.run(make())

    async def async_verdict() -> int:
        return (await async_client.verify_key(created.secret)).result

    async def async_live() -> bool:
        stats = async_client.cache_stats()
        return stats is not None and stats.live

    with keystile.Client(server.address, cache=True) as sync_client:
        eventually(live(sync_client))
        assert aio.run(async_verdict()) == VALID  # starts the async subscription
        eventually(lambda: aio.run(async_live()))
        for _ in range(2):
            assert sync_client.verify_key(created.secret).result == VALID
            assert aio.run(async_verdict()) == VALID
        with server.client() as admin:
            admin.revoke_key(created.key.id)
        eventually(lambda: sync_client.verify_key(created.secret).result == REVOKED, timeout=2)
        eventually(lambda: aio.run(async_verdict()) == REVOKED, timeout=2)
        stats = sync_client.cache_stats()
        assert stats is not None and stats.invalidations >= 1
    aio.run(async_client.close())


def test_a_broken_stream_drops_the_cache_and_falls_back_to_rpc(
    server: RunningServer, module_db_url: str, owner: str
) -> None:
    secret = heard_key(server, owner, "fallback").secret
    with keystile.Client(server.address, cache=True) as client:
        eventually(live(client))
        client.verify_key(secret)
        assert client.verify_key(secret).result == VALID
        resets = client.cache_stats().resets  # type: ignore[union-attr]
        Db(module_db_url).execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = 'keystile-listener' AND datname = current_database()"
        )
        eventually(lambda: client.cache_stats().resets > resets)  # type: ignore[union-attr]
        before = server.metrics()[VERIFIED]
        assert client.verify_key(secret).result == VALID  # answered, by the server
        assert server.metrics()[VERIFIED] == before + 1
        eventually(live(client), timeout=10)  # and it subscribes again


def test_the_servers_staleness_bound_caps_the_clients(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    server = fresh(max_staleness=0.3)
    secret = heard_key(server, owner, "short-lived-verdicts").secret
    with keystile.Client(server.address, cache=True, max_staleness=60) as client:
        eventually(live(client))
        client.verify_key(secret)
        before = server.metrics()[VERIFIED]
        assert client.verify_key(secret).result == VALID
        assert server.metrics()[VERIFIED] == before  # fresh: from memory
        time.sleep(0.4)
        assert client.verify_key(secret).result == VALID
        assert server.metrics()[VERIFIED] == before + 1  # stale: asked again


def test_without_a_server_the_caching_client_still_answers_errors_plainly() -> None:
    with keystile.Client("127.0.0.1:1", cache=True, timeout=0.5) as client:
        with pytest.raises(keystile.UnavailableError):
            client.verify_key(keystile.generate_key("ks"))
        assert client.cache_stats().live is False  # type: ignore[union-attr]


# --- the cache's rules, on a controlled clock -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verdict(result: int = VALID, expire_time: datetime | None = None) -> keys_pb2.VerifyKeyResponse:
    response = keys_pb2.VerifyKeyResponse(result=result)  # type: ignore[arg-type]
    response.key.id = "k"
    if expire_time is not None:
        response.key.expire_time.FromDatetime(expire_time)
    return response


def test_rules_silence_drops_everything_and_abandons_the_stream() -> None:
    clock = Clock()
    cache = VerdictCache(max_entries=10, max_staleness=30, clock=clock)
    abandoned: list[bool] = []
    cache.on_silence = lambda: abandoned.append(True)
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    cache.put(b"h", (), "", verdict(), cache.epoch)
    clock.now += 5.9
    assert cache.get(b"h", (), "") is not None  # within three heartbeats
    cache.heard()
    clock.now += 6.1
    assert cache.get(b"h", (), "") is None  # three heartbeats of silence
    assert abandoned == [True]
    assert not cache.live and cache.stats().entries == 0


def test_rules_a_fill_racing_an_invalidation_is_not_stored() -> None:
    cache = VerdictCache(max_entries=10, max_staleness=30, clock=Clock())
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    epoch = cache.epoch  # the RPC starts...
    cache.invalidate([b"h"])  # ...the key changes while it is in flight...
    cache.put(b"h", (), "", verdict(), epoch)  # ...and its answer arrives
    assert cache.get(b"h", (), "") is None


def test_rules_invalidation_drops_every_verdict_for_the_key() -> None:
    cache = VerdictCache(max_entries=10, max_staleness=30, clock=Clock())
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    for scopes in [(), ("a",), ("b",)]:
        cache.put(b"h", scopes, "", verdict(), cache.epoch)
    cache.put(b"other", (), "", verdict(), cache.epoch)
    cache.invalidate([b"h"])
    assert [cache.get(b"h", s, "") for s in [(), ("a",), ("b",)]] == [None, None, None]
    assert cache.get(b"other", (), "") is not None


def test_rules_no_verdict_outlives_the_keys_expiry_or_the_staleness_bound() -> None:
    clock = Clock()
    wall = Clock()
    wall.now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    cache = VerdictCache(max_entries=10, max_staleness=30, clock=clock, wall_clock=wall)
    cache.ready(heartbeat_interval=60, server_max_staleness=10)  # the server's bound is smaller
    cache.put(
        b"expiring", (), "", verdict(expire_time=datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)), cache.epoch
    )
    cache.put(b"plain", (), "", verdict(), cache.epoch)
    wall.now += 5
    assert cache.get(b"expiring", (), "") is None
    clock.now += 9.9
    assert cache.get(b"plain", (), "") is not None
    clock.now += 0.2
    assert cache.get(b"plain", (), "") is None


def test_rules_nothing_is_cached_before_ready_or_after_a_break() -> None:
    cache = VerdictCache(max_entries=10, max_staleness=30, clock=Clock())
    cache.put(b"h", (), "", verdict(), cache.epoch)
    assert cache.get(b"h", (), "") is None
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    cache.put(b"h", (), "", verdict(), cache.epoch)
    cache.broken()
    assert cache.get(b"h", (), "") is None
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    assert cache.get(b"h", (), "") is None  # READY starts from empty


def test_rules_the_cache_is_bounded() -> None:
    cache = VerdictCache(max_entries=3, max_staleness=30, clock=Clock())
    cache.ready(heartbeat_interval=2, server_max_staleness=30)
    for i in range(5):
        cache.put(bytes([i]), (), "", verdict(), cache.epoch)
    assert cache.stats().entries == 3
    assert cache.get(bytes([0]), (), "") is None and cache.get(bytes([4]), (), "") is not None


def test_async_client_without_cache_starts_no_task(server: RunningServer, aio: AioLoop) -> None:
    async def run() -> int:
        async with keystile.AsyncClient(server.address) as client:
            await client.verify_key("junk")
            return len([t for t in asyncio.all_tasks() if t.get_name() == "keystile-watch"])

    assert aio.run(run()) == 0


def test_a_subscriber_too_far_behind_is_closed_not_silently_skipped(aio: AioLoop) -> None:
    """The hub never drops an event: it ends the stream so the client drops its cache."""
    from keystile_server.errors import EventsUnavailable
    from keystile_server.watch import MAX_QUEUED, KeyEventHub

    async def settle() -> None:  # publish leaves on the next loop turn, fan-out on the one after
        for _ in range(3):
            await asyncio.sleep(0)

    async def scenario() -> tuple[bytes, str, int]:
        hub = KeyEventHub()
        with pytest.raises(EventsUnavailable):
            hub.subscribe()  # events are not flowing yet
        hub.open()
        keeping_up, falling_behind = hub.subscribe(), hub.subscribe()
        hub.publish(b"a" * 32)
        await settle()
        first = await keeping_up.next_message(1)
        for i in range(MAX_QUEUED + 1):
            hub.publish(i.to_bytes(32, "big"))
            await settle()
            await keeping_up.next_message(1)
        with pytest.raises(EventsUnavailable) as caught:
            await falling_behind.next_message(1)
        return first, caught.value.message, len(hub)

    first, message, left = aio.run(scenario())
    assert keys_pb2.WatchKeyEventsResponse.FromString(first).key_hashes == [b"a" * 32]
    assert "too slow" in message
    assert left == 1, "the slow subscriber is forgotten by the hub (its queue freed)"
