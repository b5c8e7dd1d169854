"""`keystile serve --workers N`: N processes on one port, each caching, all refusing a revoked key.

Runs the real command. Separate channels with their own subchannel pools open separate TCP
connections, which the kernel spreads over the workers; twelve of them reach all three workers
with overwhelming likelihood, and the test checks the per-worker listeners directly.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from fix_db import Db
from fix_server import ADMIN_KEY, ServeProcess, eventually, free_port, postgres_for, scrape_metrics

import keystile
from keystile import VerifyResult

LISTENERS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE application_name = 'keystile-listener' AND datname = current_database()"
)


def workers_of(proc: ServeProcess) -> list[psutil.Process]:
    children = psutil.Process(proc.proc.pid).children()
    return [child for child in children if "resource_tracker" not in " ".join(child.cmdline())]


@pytest.fixture(scope="module")
def workers_db_url(make_database: Callable[[], str]) -> str:
    return make_database()


@pytest.fixture(scope="module")
def three(
    workers_db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeProcess, str]]:
    metrics = f"127.0.0.1:{free_port()}"
    served = ServeProcess(
        "--workers",
        "3",
        "--database-url",
        workers_db_url,
        "--metrics-listen",
        metrics,
        cwd=tmp_path_factory.mktemp("workers"),
    )
    served.wait_serving()
    yield served, metrics
    served.stop()


def separate_clients(address: str, count: int) -> list[keystile.Client]:
    """Clients on channels that do not share connections (so they land on different workers)."""
    return [
        keystile.Client(
            address,
            api_key=ADMIN_KEY,
            channel=grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]),
        )
        for _ in range(count)
    ]


def test_each_worker_listens_and_a_revocation_reaches_them_all(
    three: tuple[ServeProcess, str], workers_db_url: str, owner: str
) -> None:
    served, metrics = three
    db = Db(workers_db_url)
    eventually(lambda: db.scalar(LISTENERS) == 3, timeout=30)
    assert len(workers_of(served)) == 3
    clients = separate_clients(served.address, 12)
    try:
        created = clients[0].create_key(owner, "spread", scopes=["jobs:read"])
        # Every worker learns of the creation by its event (milliseconds), then caches the key.
        eventually(
            lambda: all(
                c.verify_key(created.secret).result == VerifyResult.VERIFY_RESULT_VALID for c in clients
            ),
            timeout=2,
        )
        clients[0].revoke_key(created.key.id)
        eventually(
            lambda: all(
                c.verify_key(created.secret).result == VerifyResult.VERIFY_RESULT_REVOKED for c in clients
            ),
            timeout=2,
        )
    finally:
        for client in clients:
            client.close()
    # The supervisor's /metrics adds up every worker (each publishes its hot counters once per
    # health-check interval): 12 VALID answers, and the creation and the revocation each reached
    # all three listeners.
    eventually(
        lambda: scrape_metrics(metrics)["keystile_verifications_total{result=valid}"] >= 12, timeout=10
    )
    assert scrape_metrics(metrics)["keystile_key_events_total"] >= 6


def test_updates_and_disabling_reach_every_worker_and_caching_client(
    three: tuple[ServeProcess, str], workers_db_url: str, owner: str
) -> None:
    """UpdateKey and disabling propagate like a revocation: a removed scope is refused everywhere."""
    served, _ = three
    db = Db(workers_db_url)
    eventually(lambda: db.scalar(LISTENERS) == 3, timeout=30)
    clients = separate_clients(served.address, 12)
    caching = keystile.Client(served.address, api_key=ADMIN_KEY, cache=True)
    everyone = [*clients, caching]
    try:
        created = clients[0].create_key(owner, "spread", scopes=["jobs:read", "jobs:write"])

        def results(**kw: object) -> set[int]:
            return {c.verify_key(created.secret, **kw).result for c in everyone}  # type: ignore[arg-type]

        # A creation reaches the other workers' key filters by the same event as any change:
        # until it arrives (milliseconds), they may still answer NOT_FOUND.
        eventually(
            lambda: results(required_scopes=["jobs:write"]) == {VerifyResult.VERIFY_RESULT_VALID}, timeout=2
        )
        assert results(required_scopes=["jobs:write"]) == {VerifyResult.VERIFY_RESULT_VALID}  # all cached
        clients[0].update_key(created.key.id, scopes=["jobs:read"])
        eventually(
            lambda: (
                results(required_scopes=["jobs:write"]) == {VerifyResult.VERIFY_RESULT_INSUFFICIENT_SCOPE}
            ),
            timeout=2,
        )
        assert results(required_scopes=["jobs:read"]) == {VerifyResult.VERIFY_RESULT_VALID}
        clients[0].update_key(created.key.id, disabled=True)
        eventually(lambda: results() == {VerifyResult.VERIFY_RESULT_DISABLED}, timeout=2)
        clients[0].update_key(created.key.id, disabled=False)
        eventually(lambda: results() == {VerifyResult.VERIFY_RESULT_VALID}, timeout=2)
        rolled = clients[0].roll_key(created.key.id)  # no grace: the old secret stops everywhere
        eventually(lambda: results() == {VerifyResult.VERIFY_RESULT_EXPIRED}, timeout=2)
        assert {c.verify_key(rolled.secret).result for c in everyone} == {VerifyResult.VERIFY_RESULT_VALID}
        stats = caching.cache_stats()
        assert stats is not None and stats.hits > 0  # the caching client answered from memory
    finally:
        for client in everyone:
            client.close()


def test_a_killed_worker_is_replaced(three: tuple[ServeProcess, str], workers_db_url: str) -> None:
    served, _ = three
    db = Db(workers_db_url)
    eventually(lambda: db.scalar(LISTENERS) == 3, timeout=30)
    victim = workers_of(served)[0]
    victim.kill()
    victim.wait(10)
    eventually(
        lambda: len(workers_of(served)) == 3 and victim.pid not in [w.pid for w in workers_of(served)],
        timeout=30,
    )
    eventually(lambda: db.scalar(LISTENERS) == 3, timeout=30)
    with keystile.Client(served.address, api_key=ADMIN_KEY) as client:
        assert client.verify_key("nope").result == VerifyResult.VERIFY_RESULT_MALFORMED


def test_sigterm_drains_every_worker(make_database: Callable[[], str], tmp_path: Path) -> None:
    url = make_database()  # its own, so that only these workers' listeners are counted
    served = ServeProcess("--workers", "2", "--database-url", url, cwd=tmp_path)
    served.wait_serving()
    # Both workers up (a worker still importing when SIGTERM comes just exits: nothing to drain).
    db = Db(url)
    eventually(lambda: db.scalar(LISTENERS) == 2, timeout=30)
    workers = workers_of(served)
    assert len(workers) == 2
    assert served.stop(signal.SIGTERM) == 0
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert served.log().count("stopped") == 3  # two workers and the supervisor
    with socket.socket() as probe:  # the port is free again
        probe.bind(("127.0.0.1", served.port))


def test_repeated_sigterm_stops_workers_and_the_embedded_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    served = ServeProcess(
        "--workers", "2", "--data-dir", str(data_dir), cwd=tmp_path, env={"KEYSTILE_DATABASE_URL": ""}
    )
    served.wait_serving()
    eventually(lambda: served.log().count("ready: database connected") == 2, timeout=30)
    workers = workers_of(served)
    assert served.stop_insistently() == 0, served.log()
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert not postgres_for((data_dir / "pgdata").resolve()), "the embedded PostgreSQL outlived the server"
    assert served.log().count("stopped") == 3  # two workers and the supervisor


def test_workers_refuse_a_taken_port(
    three: tuple[ServeProcess, str], workers_db_url: str, tmp_path: Path
) -> None:
    served, _ = three
    # The later --listen wins over the free port ServeProcess picked: aim at the running server.
    clash = ServeProcess(
        "--workers", "2", "--database-url", workers_db_url, "--listen", served.address, cwd=tmp_path
    )
    assert clash.proc.wait(30) != 0
    assert "cannot listen on" in clash.log()
    clash.stop()


def test_keystile_bench_reports_percentiles_and_cleans_up(
    three: tuple[ServeProcess, str], owner: str
) -> None:
    """The load generator users point at their deployment: a short run against the 3 workers."""
    import json

    from fix_server import run_cli

    served, _ = three
    result = run_cli(
        "bench",
        "--target",
        served.address,
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "-c",
        "4",
        "-p",
        "2",
        "--keys",
        "3",
        "--owner",
        owner,
        "--mix",
        "valid=2,unknown=1,malformed=1,revoked=1",
        "--json",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calls"] > 0 and report["errors"] == 0
    assert set(report["results"]) == {"valid", "not_found", "malformed", "revoked"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    with keystile.Client(served.address, api_key=ADMIN_KEY) as client:
        assert list(client.iter_keys(owner)) == []  # every key the run made is revoked again


def test_keystile_bench_drives_envoys_check_and_counts_its_http_answers(
    three: tuple[ServeProcess, str], owner: str
) -> None:
    """``--rpc check``: the Envoy ext_authz load, requests shaped like Envoy's, answers by HTTP status."""
    import json

    from fix_server import run_cli

    served, _ = three
    result = run_cli(
        "bench",
        *("--target", served.address, "--rpc", "check", "--duration", "1", "--warmup", "0.2"),
        *("-c", "4", "--keys", "2", "--owner", owner, "--mix", "valid=3,unknown=1,revoked=1", "--json"),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rpc"] == "check" and report["errors"] == 0
    assert set(report["results"]) == {"http_200", "http_401"}
    assert report["results"]["http_200"] > report["results"]["http_401"] > 0


def test_keystile_bench_rejects_a_bad_mix(three: tuple[ServeProcess, str]) -> None:
    from fix_server import run_cli

    served, _ = three
    result = run_cli("bench", "--target", served.address, "--mix", "valid=1,bogus=2")
    assert result.returncode != 0
    assert "--mix" in result.stderr and "bogus" in result.stderr


def test_keystile_bench_fails_fast_on_an_unreachable_target() -> None:
    from fix_server import run_cli

    result = run_cli(
        "bench", "--target", f"127.0.0.1:{free_port()}", "--rpc", "health", "-d", "1", timeout=60
    )
    assert result.returncode == 1
    assert "cannot connect to" in result.stderr
