"""WatchKeyEvents cannot stall a server: capped, bounded per subscriber, tied to its credential.

Real servers, real gRPC streams; events come from real changes in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from fix_db import Db
from fix_server import AioLoop, RunningServer, eventually

from keystile._errors import from_rpc_error
from keystile.v1 import keys_pb2, keys_pb2_grpc

WATCHERS = "keystile_watch_subscribers"


def open_stream(channel: grpc.Channel, secret: str | None = None) -> grpc.Future:
    stub = keys_pb2_grpc.KeyServiceStub(channel)
    metadata = (("authorization", f"Bearer {secret}"),) if secret else None
    return stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(), metadata=metadata, timeout=30)  # type: ignore[no-any-return]


def drain(stream: grpc.Future) -> None:
    """Read a stream until it ends (with an error, here)."""
    for _ in stream:
        pass


def first_message(stream: grpc.Future) -> str:
    """READY, or the status code the stream ended with instead."""
    try:
        return str(keys_pb2.KeyEventType.Name(next(stream).type))
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]


def test_streams_beyond_max_watchers_are_resource_exhausted(fresh: Callable[..., RunningServer]) -> None:
    server = fresh(max_watchers=3)
    channel = grpc.insecure_channel(server.address)
    streams = [open_stream(channel) for _ in range(3)]
    for stream in streams:
        assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    refused = open_stream(channel)
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    error = from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "TOO_MANY_WATCHERS"
    # A place frees up when a stream ends.
    streams[0].cancel()
    eventually(lambda: _accepts(channel))
    for stream in streams[1:]:
        stream.cancel()
    channel.close()


def _accepts(channel: grpc.Channel) -> bool:
    stream = open_stream(channel)
    try:
        return bool(next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY)
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()


def _churn(db: Db, owner: str, times: int) -> None:
    """Change every key of ``owner`` ``times`` times: one event per key per change."""
    for _ in range(times):
        db.execute("UPDATE keystile.keys SET name = name || '.' WHERE owner_id = %s", (owner,))


def test_a_subscriber_that_stops_reading_is_ended_and_forgotten(
    fresh: Callable[..., RunningServer], module_db_url: str, aio: AioLoop, owner: str
) -> None:
    """A client that never reads fills gRPC's window; the server ends it instead of holding it open."""
    server = fresh(max_staleness=1.0)
    db = Db(module_db_url)
    db.execute(
        """INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint)
           SELECT gen_random_uuid(), %s, 'k' || i, 'ks', sha256(('churn' || i || %s)::bytea), 'ks_x'
             FROM generate_series(1, 500) AS i""",
        (owner, owner),
    )

    async def never_read() -> tuple[grpc.StatusCode, float]:
        # Without BDP probing the client's window stays at 64 KiB, so the server's writes block
        # soon (with it, gRPC lets a window grow to megabytes before a write waits).
        async with grpc.aio.insecure_channel(
            server.address, options=[("grpc.http2.bdp_probe", 0)]
        ) as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            call = stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(), timeout=60)
            await call.read()  # READY
            await asyncio.to_thread(_churn, db, owner, 12)  # ~200 KB of events: the window fills
            await asyncio.sleep(1.5)  # stalled for longer than max_staleness
            await asyncio.to_thread(_churn, db, owner, 1)  # the next delivery finds it stalled
            gone = time.monotonic()
            await asyncio.to_thread(eventually, lambda: server.metrics()[WATCHERS] == 0, 10)
            gone = time.monotonic() - gone
            while True:  # what was buffered, then the status
                try:
                    if await call.read() is grpc.aio.EOF:
                        break
                except grpc.RpcError:
                    break
            return await call.code(), gone

    code, _ = aio.run(never_read())
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_stream_ends_when_its_credential_is_revoked(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    server = fresh(verify_auth="required")
    with server.client() as admin:
        verifier = admin.create_key(owner, "watcher", scopes=["keys:verify"])
        other = admin.create_key(owner, "someone else", scopes=["keys:verify"])
        channel = grpc.insecure_channel(server.address)
        stream = open_stream(channel, verifier.secret)
        assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
        admin.revoke_key(other.key.id)  # another key's change is just an event
        assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_INVALIDATE
        admin.revoke_key(verifier.key.id)
    with pytest.raises(grpc.RpcError) as caught:
        drain(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        next(open_stream(channel, verifier.secret))  # resubscribing: authenticated afresh
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    channel.close()


def test_a_stream_ends_when_its_credential_expires(fresh: Callable[..., RunningServer], owner: str) -> None:
    server = fresh(verify_auth="required")
    with server.client() as admin:
        verifier = admin.create_key(owner, "short-lived watcher", scopes=["keys:verify"], ttl=2)
    channel = grpc.insecure_channel(server.address)
    stream = open_stream(channel, verifier.secret)
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    with pytest.raises(grpc.RpcError) as caught:
        drain(stream)
    error = from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and error.reason == "CREDENTIALS_EXPIRED"
    channel.close()


def test_many_idle_streams_do_not_stall_verification(
    fresh: Callable[..., RunningServer], module_db_url: str, owner: str
) -> None:
    """Small-scale version of the make chaos scenario: streams beyond the cap are refused at once."""
    server = fresh(max_watchers=100)
    channels = [grpc.insecure_channel(server.address) for _ in range(10)]
    streams = [open_stream(channels[i % 10]) for i in range(150)]
    outcomes = Counter(first_message(stream) for stream in streams)
    assert outcomes == {"KEY_EVENT_TYPE_READY": 100, "RESOURCE_EXHAUSTED": 50}
    with server.client() as client:
        secret = client.create_key(owner, "busy").secret
        for i in range(20):
            client.create_key(owner, f"event {i}")
        for _ in range(50):
            assert client.verify_key(secret).result == keys_pb2.VERIFY_RESULT_VALID
    assert server.metrics()[WATCHERS] <= 100
    for stream in streams:
        stream.cancel()
    for channel in channels:
        channel.close()


def test_a_watcher_leaving_mid_stream_is_not_an_error(
    fresh: Callable[..., RunningServer], owner: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = fresh()
    caplog.set_level(logging.INFO)
    with server.client() as admin:
        for _ in range(5):
            channel = grpc.insecure_channel(server.address)
            stream = open_stream(channel)
            next(stream)
            admin.create_key(owner, "event while leaving")
            channel.close()  # mid-stream, events pending
        eventually(lambda: server.metrics()[WATCHERS] == 0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
