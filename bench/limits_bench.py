"""The limits part of ``make bench``: request shapes, limited keys, and the bound at 600 per minute.

- ``shape_requests``: cached VerifyKey requests that name more than a key (scopes, a resource, a
  cost), each measured against the no-op like the key-only hit;
- ``seed_limited``: keys with a limit far beyond the load (every call spends a unit, none is
  refused), to compare a limited key's hit with an unlimited one's;
- ``bound_run``: one key limited to 600 per minute, driven at 5x by 6 plain callers spread over 3
  worker processes and 2 caching clients for 3 minutes: every VALID answer's [sent, answered]
  span is recorded, and the most certainly decided within one window is reported with the count
  per window;
- ``client_limited_rate``: a caching client's verifications per second of a limited key.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
import psycopg

import keystile
from keystile.v1 import keys_pb2

HUGE_LIMIT = [{"name": "bench", "limit": 10**12, "window_ms": 60_000, "burst": 0}]
BOUND_LIMIT = 600
BOUND_WINDOW = 60.0


def seed_limited(url: str, secrets_: list[str], *, owner: str) -> None:
    """Keys with a limit no bench reaches, inserted straight into the table."""
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        cur.copy(
            "COPY keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint, scopes, limits)"
            " FROM STDIN"
        ) as copy,
    ):
        import uuid

        for secret in secrets_:
            parsed = keystile.parse_key(secret)
            assert parsed is not None
            copy.write_row(
                (
                    str(uuid.uuid4()),
                    owner,
                    "bench limited",
                    "ks",
                    keystile.hash_key(secret),
                    parsed.hint,
                    ["bench:verify"],
                    json.dumps(HUGE_LIMIT),
                )
            )


def shape_requests(secrets_: list[str]) -> dict[str, list[bytes]]:
    """Serialized VerifyKeyRequests of each shape a service sends, for cached keys."""
    shapes = {
        "scopes": {"required_scopes": ["bench:verify"]},
        "resource": {"resource": "project-42"},
        "cost": {"cost": 2},
    }
    return {
        name: [keys_pb2.VerifyKeyRequest(key=s, **fields).SerializeToString() for s in secrets_]  # type: ignore[arg-type]
        for name, fields in shapes.items()
    }


def _drive(
    client: keystile.Client,
    secret: str,
    rate: float,
    until: float,
    admitted: list[tuple[float, float]],
    counts: dict[str, int],
) -> None:
    interval = 1 / rate
    next_at = time.monotonic()
    while (now := time.monotonic()) < until:
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        sent = time.monotonic()
        try:
            result = client.verify_key(secret).result
        except keystile.KeystileError:
            counts["errors"] = counts.get("errors", 0) + 1
            continue
        answered = time.monotonic()
        counts["calls"] = counts.get("calls", 0) + 1
        if result == keys_pb2.VERIFY_RESULT_VALID:
            admitted.append((sent, answered))


def worst_window(admitted: list[tuple[float, float]], window: float) -> int:
    """The most admissions certainly decided within one interval of ``window`` seconds."""
    spans = sorted(admitted)
    answered_sorted = [a for _, a in spans]
    worst = 0
    for i, (start, _) in enumerate(spans):
        worst = max(worst, sum(1 for a in answered_sorted[i:] if a < start + window))
    return worst


def bound_run(address: str, admin_key: str, seconds: float) -> dict[str, Any]:
    """600 per minute, 5x demand, 6 plain callers (spread over the workers) and 2 caching clients."""
    with keystile.Client(address, api_key=admin_key) as admin:
        secret = admin.create_key(
            "bench", "bound", limits=[keystile.rate_limit("per_minute", BOUND_LIMIT, BOUND_WINDOW)]
        ).secret

    def channel() -> grpc.Channel:
        return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])

    plain = [keystile.Client(address, channel=channel()) for _ in range(6)]
    caching = [keystile.Client(address, channel=channel(), cache=True) for _ in range(2)]
    callers = plain + caching
    demand = 5 * BOUND_LIMIT / BOUND_WINDOW
    admitted: list[tuple[float, float]] = []
    counts: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 10
        while not all(c.cache_stats().live for c in caching) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        start = time.monotonic()
        until = start + seconds
        threads = [
            threading.Thread(target=_drive, args=(c, secret, demand / len(callers), until, admitted, counts))
            for c in callers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for c in callers:
            c.close()
    windows = int(seconds // BOUND_WINDOW)
    per_window = [0] * windows
    for _, answered in admitted:
        index = int((answered - start) // BOUND_WINDOW)
        if 0 <= index < windows:
            per_window[index] += 1
    return {
        "limit": BOUND_LIMIT,
        "window_s": BOUND_WINDOW,
        "seconds": seconds,
        "calls": counts.get("calls", 0),
        "errors": counts.get("errors", 0),
        "admitted": len(admitted),
        "max_in_any_window": worst_window(admitted, BOUND_WINDOW),
        "per_window": per_window,
        "min_per_window": min(per_window, default=0),
    }


def client_limited_rate(address: str, secrets_: list[str]) -> dict[str, Any]:
    """A caching client's verifications per second of limited keys, on this process's core."""
    with keystile.Client(address, cache=True) as client:
        deadline = time.monotonic() + 10
        while not client.cache_stats().live and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        for _ in range(50):  # the client learns the keys' traffic and leases in batches
            for secret in secrets_:
                client.verify_key(secret)
        n, valid = 0, 0
        started = time.perf_counter()
        while time.perf_counter() - started < 2.0:
            for secret in secrets_:
                valid += client.verify_key(secret).result == keys_pb2.VERIFY_RESULT_VALID
            n += len(secrets_)
        elapsed = time.perf_counter() - started
        stats = client.cache_stats()
    assert stats is not None
    return {
        "verifications": n,
        "valid": valid,
        "per_second": round(n / elapsed),
        "hit_ratio": round(stats.hits / max(1, stats.hits + stats.misses), 4),
    }
