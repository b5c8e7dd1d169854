"""``make chaos``: keystile under faults and abuse, at the scale the hardening issue measured.

Each scenario runs real `keystile serve` processes on an embedded PostgreSQL, PostgreSQL and the
servers on CPU 0, load and probes on CPU 1, and prints what it measured:

1. **Unknown-key flood**: 30 s of distinct, well-formed, unknown keys at 2,269 a second (the
   issue's rate), while a probe verifies real (cached) keys at 1 in flight. Reports database
   lookups per unknown key, and the probe's p50/p99 against the probe beside the same offered
   load of known keys (and alone).
2. **Never-reading watchers**: 10,000 WatchKeyEvents attempts over 1,000 connections that never
   read, then 20 key changes. Reports streams accepted and refused, cached VerifyKey p50/p99
   during the changes against before, one create+revoke's time, and server memory.
3. **Idle-connection flood**: a server whose open-file limit is 4,096 flooded with 8,000 TCP
   connections that never speak. Reports how long until a new client is served, and the log line.
4. **Black-holed database**: a TCP proxy between the server and PostgreSQL stops forwarding
   (tests/fix_proxy.py). 30 s of misses with a 2 s client deadline: how each was answered and how
   fast, health, server memory; then the recovery time. Then a stopped database (connections
   refused): the answer time for calls after the first failure.
5. **GetKey existence oracle**: a tenant's GetKey on another owner's id against an unknown id,
   2,000 of each interleaved: the difference of medians.
6. **Fuzzing**: the suite's fuzz test with 22,500 examples per kind (raw bytes, typed requests).

Results go to bench/results/chaos.json. Nothing here passes or fails: the numbers are reported,
with the issue's targets alongside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from run import ADMIN_KEY, BIN, LOAD_CPU, RESULTS, SERVER_CPU, Served, log, machine, seed, vacuum

import keystile
from keystile.v1 import keys_pb2, keys_pb2_grpc
from keystile_server.bench import LoadResult, LoadSpec, run_load
from keystile_server.bench_requests import verify_requests
from keystile_server.embedded import EmbeddedPostgres
from keystile_server.processes import run_async
from keystile_server.store import migrate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fix_proxy import PgProxy  # noqa: E402  (a test fixture module, used here as a tool)

FLOOD_SECONDS = float(os.environ.get("CHAOS_FLOOD_SECONDS", "30"))
FLOOD_RATE = 2_269.0
"""Unknown keys per second: the rate the hardening issue measured its flood at."""
WATCH_ATTEMPTS, WATCH_CONNECTIONS, WATCH_EVENTS = 10_000, 1_000, 20
IDLE_LIMIT, IDLE_FLOOD = 4_096, 8_000
FUZZ_EXAMPLES = int(os.environ.get("CHAOS_FUZZ_EXAMPLES", "22500"))


def probe(address: str, secrets_: list[str], seconds: float) -> LoadSpec:
    return LoadSpec(
        target=address,
        requests=verify_requests(secrets_),
        concurrency=1,
        duration=seconds,
        warmup=0.5,
        cpus=tuple(LOAD_CPU),
    )


def latency(result: LoadResult) -> dict[str, float]:
    return {"p50_ms": round(result.percentile_ms(50), 3), "p99_ms": round(result.percentile_ms(99), 3)}


def in_thread(target: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target(*args)), daemon=True)
    thread.start()
    return thread, out


def rss_mb(server: Served) -> float:
    return round(server.process.memory_info().rss / 2**20, 1)


def warm(server: Served, hot: list[str]) -> LoadResult:
    """Cache ``hot`` in the server, then probe it alone for 8 s: the baseline."""
    with keystile.Client(server.address) as client:
        for secret in hot:
            client.verify_key(secret)
    return run_load(probe(server.address, hot, 8))


def unknown_key_flood(url: str, real: list[str]) -> dict[str, Any]:
    server = Served(url, "chaos-unknown-flood")
    server.wait_serving()
    try:
        hot = real[:100]
        alone = warm(server, hot)

        def flood(keys: list[str], seconds: float) -> LoadSpec:
            return LoadSpec(
                target=server.address,
                requests=verify_requests(keys),
                concurrency=16,
                duration=seconds,
                warmup=0.5,
                cpus=tuple(LOAD_CPU),
                rate=FLOOD_RATE,
            )

        # The same offered load of real (cached) keys: what the probe sees without unknown keys.
        loading, _ = in_thread(run_load, flood(real[:1000], 12))
        time.sleep(2)
        known = run_load(probe(server.address, hot, 8))
        loading.join()
        before = server.metrics()
        unknown = [keystile.generate_key("ks") for _ in range(int(FLOOD_RATE * FLOOD_SECONDS * 1.2))]
        flooding, flood_out = in_thread(run_load, flood(unknown, FLOOD_SECONDS))
        time.sleep(2)
        during = run_load(probe(server.address, hot, FLOOD_SECONDS - 6))
        flooding.join()
        after = server.metrics()
        flood_result: LoadResult = flood_out[0]
        lookups = after.get("keystile_db_queries_total{op=find_by_hashes}", 0) - before.get(
            "keystile_db_queries_total{op=find_by_hashes}", 0
        )
        filtered = after.get("keystile_cache_lookups_total{outcome=filtered}", 0) - before.get(
            "keystile_cache_lookups_total{outcome=filtered}", 0
        )
        answered = flood_result.results.get("not_found", 0) + flood_result.results.get("valid", 0)
        return {
            "unknown_keys_per_second": round(flood_result.rate),
            "unknown_keys_answered": flood_result.calls,
            "results": dict(flood_result.results),
            "lookup_queries": int(lookups),
            "queries_per_unknown_key": round(lookups / max(answered, 1), 5),
            "answered_by_filter": int(filtered),
            "real_keys_alone": latency(alone),
            "real_keys_beside_as_many_known_keys": latency(known),
            "real_keys_during_flood": latency(during),
            "p99_ratio_to_known_key_load": round(
                during.percentile_ms(99) / max(known.percentile_ms(99), 1e-9), 2
            ),
            "filter_bytes": after.get("keystile_key_filter_bytes", 0),
            "target": "< 0.01 queries per unknown key; real keys' p99 within 2x",
        }
    finally:
        server.stop()


async def _never_reading_watchers(address: str) -> tuple[int, int, list[Any]]:
    # A subchannel pool of its own per channel: otherwise they would all share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(WATCH_CONNECTIONS)]
    calls = []
    for i in range(WATCH_ATTEMPTS):
        stub = keys_pb2_grpc.KeyServiceStub(channels[i % WATCH_CONNECTIONS])
        calls.append(stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest(), timeout=600))
    # The first message tells: READY (accepted; nothing is read after it) or the refusal.
    firsts = [asyncio.ensure_future(call.read()) for call in calls]
    await asyncio.wait(firsts, timeout=30)
    outcomes: dict[str, int] = {}
    for first in firsts:
        error = first.exception() if first.done() else None
        if not first.done():
            outcome = "no answer"
        elif error is None:
            outcome = "READY"
        elif isinstance(error, grpc.aio.AioRpcError):
            outcome = error.code().name
        else:
            outcome = type(error).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes, [*channels, *calls]


def never_reading_watchers(url: str, real: list[str]) -> dict[str, Any]:
    server = Served(url, "chaos-watchers")
    server.wait_serving()
    loop = asyncio.new_event_loop()
    holder = threading.Thread(target=loop.run_forever, daemon=True)
    holder.start()
    try:
        hot = real[:100]
        rss_before = rss_mb(server)
        alone = warm(server, hot)
        outcomes, keep = asyncio.run_coroutine_threadsafe(
            _never_reading_watchers(server.address), loop
        ).result(120)
        rss_streams = rss_mb(server)
        probing, probe_out = in_thread(run_load, probe(server.address, hot, 10))
        time.sleep(1.5)
        change_times = []
        with keystile.Client(server.address, api_key=ADMIN_KEY) as admin:
            for _ in range(WATCH_EVENTS // 2):
                started = time.monotonic()
                created = admin.create_key("chaos", "event")
                admin.revoke_key(created.key.id)
                change_times.append((time.monotonic() - started) * 1000)
                time.sleep(0.3)
        probing.join()
        during: LoadResult = probe_out[0]
        metrics = server.metrics()
        return {
            "stream_attempts": WATCH_ATTEMPTS,
            "connections": WATCH_CONNECTIONS,
            "first_message_or_status": outcomes,
            "watchers_open": metrics.get("keystile_watch_subscribers", 0),
            "verify_before": latency(alone),
            "verify_during_events": latency(during),
            "p99_ratio": round(during.percentile_ms(99) / max(alone.percentile_ms(99), 1e-9), 2),
            "create_and_revoke_ms": {
                "median": round(sorted(change_times)[len(change_times) // 2], 1),
                "max": round(max(change_times), 1),
            },
            "server_rss_mb": {
                "before": rss_before,
                "with_streams": rss_streams,
                "after_events": rss_mb(server),
            },
            "target": "cached VerifyKey p99 within 2x; memory bounded",
            "_keep": len(keep),
        }
    finally:
        loop.call_soon_threadsafe(loop.stop)
        server.stop()


def idle_connection_flood(url: str) -> dict[str, Any]:
    server = Served(url, "chaos-idle-flood", "--log-level", "info", open_files=IDLE_LIMIT)
    server.wait_serving()
    flood: list[socket.socket] = []
    try:
        host, port = server.address.rsplit(":", 1)
        started = time.monotonic()
        for _ in range(IDLE_FLOOD):
            try:
                flood.append(socket.create_connection((host, int(port)), timeout=1))
            except OSError:
                break
        flooded = time.monotonic()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        served_after = None
        while time.monotonic() - flooded < 60:
            try:
                with grpc.insecure_channel(server.address) as channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                served_after = time.monotonic() - flooded
                break
            except grpc.RpcError:
                pass
        log_text = Path(server.log_file.name).read_text(errors="replace")
        warning = next((line for line in log_text.splitlines() if "open files:" in line), "")
        return {
            "open_file_limit": IDLE_LIMIT,
            "connections_opened": len(flood),
            "seconds_to_open": round(flooded - started, 2),
            "new_client_served_after_s": round(served_after, 2) if served_after is not None else None,
            "handshake_timeout_s": 10,
            "log_line": warning.split(": ", 1)[-1][:200],
            "target": "a new client is served within the idle (handshake) timeout",
        }
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def _misses(address: str, secrets_: list[str], seconds: float, deadline: float) -> dict[str, Any]:
    """Uncached keys, 64 in flight, each with a ``deadline``: how each call ended and how fast."""
    outcomes: dict[str, int] = {}
    slowest = 0.0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(offset: int) -> None:
        nonlocal slowest
        with keystile.Client(address, timeout=deadline) as client:
            index = offset
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    outcome = keys_pb2.VerifyResult.Name(
                        client.verify_key(secrets_[index % len(secrets_)]).result
                    )
                except keystile.KeystileError as exc:
                    outcome = f"{exc.code.name}:{exc.reason}"
                took = time.monotonic() - started
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    slowest = max(slowest, took)
                index += 64

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"outcomes": outcomes, "slowest_s": round(slowest, 3)}


def black_holed_database(url: str) -> dict[str, Any]:
    proxy = PgProxy(url)
    db_timeout = 1.0  # with the client deadline of 2 s: answered before it expires
    server = Served(proxy.conninfo, "chaos-blackhole", "--db-timeout", str(db_timeout))
    server.wait_serving()
    try:
        with keystile.Client(server.address, api_key=ADMIN_KEY) as admin:
            secrets_ = [admin.create_key("chaos", f"miss {i}").secret for i in range(3000)]
        time.sleep(1)
        rss_before = rss_mb(server)
        proxy.freeze()
        frozen = time.monotonic()
        health: dict[str, float] = {}

        def watch_health() -> None:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while time.monotonic() - frozen < 20:
                    with contextlib.suppress(grpc.RpcError):
                        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 2:
                            health["not_serving_after_s"] = round(time.monotonic() - frozen, 2)
                            return
                    time.sleep(0.05)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        during = _misses(server.address, secrets_, FLOOD_SECONDS, 2.0)
        watcher.join()
        rss_during = rss_mb(server)
        proxy.thaw()
        thawed = time.monotonic()
        recovered = None
        with keystile.Client(server.address, timeout=2) as client:
            while time.monotonic() - thawed < 30:
                with contextlib.suppress(keystile.KeystileError):
                    if client.verify_key(secrets_[0]).result == keys_pb2.VERIFY_RESULT_VALID:
                        recovered = round(time.monotonic() - thawed, 2)
                        break
                time.sleep(0.02)
        proxy.cut()
        time.sleep(0.5)
        _misses(server.address, secrets_[:64], 1.0, 5.0)  # the first failures
        stopped = _misses(server.address, secrets_[64:], 5.0, 5.0)
        proxy.restore()
        return {
            "db_timeout_s": db_timeout,
            "black_holed": during,
            "health": health,
            "server_rss_mb": {"before": rss_before, "during": rss_during},
            "valid_again_after_s": recovered,
            "database_stopped_after_first_failures": stopped,
            "target": "misses answered within --db-timeout + 1 s; NOT_SERVING within two health "
            "intervals; VALID within 2 s of recovery; UNAVAILABLE within 1 s while stopped",
        }
    finally:
        server.stop()
        proxy.close()


def get_key_oracle(url: str) -> dict[str, Any]:
    server = Served(url, "chaos-oracle")
    server.wait_serving()
    try:
        with keystile.Client(server.address, api_key=ADMIN_KEY) as admin:
            tenant = admin.create_key("tenant-a", "reader", scopes=["keys:read"]).secret
            other = admin.create_key("tenant-b", "someone else's").key.id
        unknown = "00000000-0000-4000-8000-000000000000"
        times: dict[str, list[float]] = {"other_owner": [], "unknown": []}
        with keystile.Client(server.address, api_key=tenant) as client:
            for i in range(4000):
                which = ("other_owner", "unknown")[i % 2]
                started = time.perf_counter()
                with contextlib.suppress(keystile.NotFoundError):
                    client.get_key(other if which == "other_owner" else unknown)
                times[which].append(time.perf_counter() - started)
        medians = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}
        return {
            "median_us": {k: round(v, 1) for k, v in medians.items()},
            "difference_us": round(medians["other_owner"] - medians["unknown"], 1),
            "target": "both paths cost the same (was about 60 us apart)",
        }
    finally:
        server.stop()


def fuzz() -> dict[str, Any]:
    started = time.monotonic()
    result = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "--timeout=1800",  # the suite's 120 s per test is for a few hundred examples
            str(ROOT / "tests/test_fuzz.py"),
            "-k",
            "raw_bytes or typed_requests",
        ],
        env={**os.environ, "KEYSTILE_FUZZ_EXAMPLES": str(FUZZ_EXAMPLES)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {
        "inputs": 2 * FUZZ_EXAMPLES,
        "pytest": summary,
        "passed": result.returncode == 0,
        "seconds": round(time.monotonic() - started, 1),
        "target": "no INTERNAL or UNKNOWN for any input",
    }


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    os.sched_setaffinity(0, SERVER_CPU)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"keystile-chaos-{os.getpid()}"
    embedded = EmbeddedPostgres(workdir)
    url = embedded.start()
    results: dict[str, Any] = {"machine": machine()}
    try:
        run_async(migrate(url))
        real = [keystile.generate_key("ks") for _ in range(10_000)]
        seed(url, real, owner="chaos", scopes=["chaos:verify"])
        vacuum(url)
        os.sched_setaffinity(0, LOAD_CPU)
        scenarios = [
            ("unknown_key_flood", lambda: unknown_key_flood(url, real)),
            ("never_reading_watchers", lambda: never_reading_watchers(url, real)),
            ("idle_connection_flood", lambda: idle_connection_flood(url)),
            ("black_holed_database", lambda: black_holed_database(url)),
            ("get_key_oracle", lambda: get_key_oracle(url)),
            ("fuzz", fuzz),
        ]
        only = set(filter(None, os.environ.get("CHAOS_ONLY", "").split(",")))
        for name, scenario in scenarios:
            if only and name not in only:
                continue
            log(f"scenario: {name}")
            results[name] = scenario()
            results[name].pop("_keep", None)
            print(f"\n== {name}\n{json.dumps(results[name], indent=2)}", flush=True)
    finally:
        embedded.stop()
    results["seconds"] = round(time.monotonic() - started, 1)
    (RESULTS / "chaos.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {results['seconds']} s: bench/results/chaos.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
