"""Clients cannot exhaust a server's connections or file descriptors: gRPC's protections, configured.

The flood tests run the real `keystile serve` with a low open-file limit, so that exhausting it
takes hundreds of connections rather than tens of thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from fix_server import AioLoop, RunningServer, ServeProcess, eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keystile.v1 import keys_pb2, keys_pb2_grpc


def _healthy(address: str, timeout: float) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return bool(status.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_after_an_idle_connection_flood_a_new_client_is_served(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    handshake = 1.0
    served = ServeProcess(
        "--database-url",
        make_database(),
        "--handshake-timeout",
        str(handshake),
        "--health-check-interval",
        "0.2",
        "--pool-min-size",
        "1",
        "--pool-max-size",
        "2",
        cwd=tmp_path,
        open_files=(200, 200),
    )
    flood: list[socket.socket] = []
    try:
        served.wait_serving()
        for _ in range(400):  # twice the limit: never a byte sent, never closed by the client
            try:
                flood.append(socket.create_connection(("127.0.0.1", served.port), timeout=1))
            except OSError:
                break
        assert len(flood) >= 150
        started = time.monotonic()
        while not _healthy(served.address, 1.0):
            assert time.monotonic() - started < handshake + 10, "never served after the flood"
        # The flood was closed by the handshake timeout, not by the client.
        assert time.monotonic() - started < handshake + 5
        assert "open files: " in served.log() and "of the limit of 200" in served.log()
    finally:
        for sock in flood:
            sock.close()
        served.stop()


def test_the_open_file_limit_is_raised_to_the_hard_limit(database_url: str, tmp_path: Path) -> None:
    served = ServeProcess("--database-url", database_url, cwd=tmp_path, open_files=(256, 2048))
    try:
        served.wait_serving()
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == ["2048", "2048"], line
        assert "open-file limit raised from 256 to 2048" in served.log()
    finally:
        served.stop()


def test_a_raw_connection_that_never_speaks_is_closed(fresh: Callable[..., RunningServer]) -> None:
    server = fresh(handshake_timeout=0.5)
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        try:
            while sock.recv(4096):  # the server's SETTINGS (it speaks first), then EOF
                pass
        except ConnectionResetError:
            pass  # or a reset: closed either way
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "limit", [{"max_connection_idle": 0.5}, {"max_connection_age": 0.5, "max_connection_idle": 60}]
)
def test_an_idle_or_old_connection_is_closed_and_the_client_reconnects(
    fresh: Callable[..., RunningServer], aio: AioLoop, limit: dict[str, float]
) -> None:
    server = fresh(**limit)

    async def scenario() -> tuple[grpc.ChannelConnectivity, grpc.ChannelConnectivity, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            await stub.VerifyKey(keys_pb2.VerifyKeyRequest(key="junk"))
            busy = channel.get_state()
            await asyncio.sleep(1.5)
            idle = channel.get_state()
            again = await stub.VerifyKey(keys_pb2.VerifyKeyRequest(key="junk"))
            return busy, idle, again.result

    busy, idle, result = aio.run(scenario())
    assert busy == grpc.ChannelConnectivity.READY
    assert idle == grpc.ChannelConnectivity.IDLE  # the server sent GOAWAY
    assert result == keys_pb2.VERIFY_RESULT_MALFORMED


def test_streams_beyond_the_per_connection_limit_wait_for_a_free_one(
    fresh: Callable[..., RunningServer],
) -> None:
    server = fresh(max_concurrent_streams=3)
    channel = grpc.insecure_channel(server.address)
    stub = keys_pb2_grpc.KeyServiceStub(channel)
    stub.VerifyKey(keys_pb2.VerifyKeyRequest(key="junk"), timeout=5)  # settings now known
    streams = [stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(), timeout=30) for _ in range(3)]
    for stream in streams:
        assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    fourth = stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(), timeout=30)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(next(fourth).type), daemon=True)
    reader.start()
    reader.join(1.0)
    assert not got, "a fourth stream ran on a connection limited to three"
    streams[0].cancel()
    reader.join(5)
    assert got == [keys_pb2.KEY_EVENT_TYPE_READY]
    for stream in (*streams[1:], fourth):
        stream.cancel()
    channel.close()


def test_a_client_pinging_too_often_is_disconnected(fresh: Callable[..., RunningServer]) -> None:
    server = fresh()
    abusive = grpc.insecure_channel(
        server.address,
        options=[
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    stream = keys_pb2_grpc.KeyServiceStub(abusive).WatchKeyEvents(
        keys_pb2.WatchKeyEventsRequest(), timeout=20
    )
    assert next(stream).type == keys_pb2.KEY_EVENT_TYPE_READY
    started = time.monotonic()
    with contextlib.suppress(grpc.RpcError):
        for _ in stream:  # heartbeats, until the server sends GOAWAY (too many pings)
            pass
    assert stream.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert time.monotonic() - started < 10
    abusive.close()
    eventually(lambda: _healthy(server.address, 1.0))
