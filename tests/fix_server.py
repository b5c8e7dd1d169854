"""Server fixtures: real keystile servers on real ports, and clients talking to them.

In-process servers run on one background event loop (grpc.aio wants a single loop per process);
tests talk to them over real TCP channels with the public clients. ``ServeProcess`` runs the real
``keystile serve`` command for the CLI, grpcurl, signal and restart tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import keystile
from keystile_server.server import KeystileServer
from keystile_server.settings import Settings

T = TypeVar("T")
BIN = Path(sys.executable).parent
ADMIN_KEY = "test-static-admin-" + secrets.token_hex(16)
"""The static admin secret every test server accepts (KEYSTILE_ADMIN_KEY)."""


class AioLoop:
    """One asyncio loop on a daemon thread, shared by every in-process server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"{coro.__qualname__} did not finish in {timeout}s\n{self.dump()}") from None

    def dump(self) -> str:
        """Where the loop thread is, and every pending task's stack: what a hang is waiting on."""
        import io
        import traceback

        out = io.StringIO()
        frame = sys._current_frames().get(self.thread.ident or 0)
        if frame is not None:
            out.write("loop thread:\n" + "".join(traceback.format_stack(frame)))
        for task in list(asyncio.all_tasks(self.loop)):
            out.write(f"\n{task!r}\n")
            try:
                task.print_stack(limit=20, file=out)
            except Exception as exc:  # a frame of compiled code (grpc's Cython) has no line number
                out.write(f"  (stack not printable: {exc!r})\n")
        return out.getvalue()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()  # its self-pipe sockets, which would otherwise be left to the GC


@pytest.fixture(scope="session")
def aio() -> Iterator[AioLoop]:
    loop = AioLoop()
    yield loop
    loop.close()


def server_settings(database_url: str, **changes: Any) -> Settings:
    """Settings for an in-process test server: any free port, fast background loops."""
    base = Settings(
        database_url=database_url,
        listen="127.0.0.1:0",
        usage_flush_interval=0.1,
        health_check_interval=0.2,
        db_timeout=2.0,
        shutdown_grace=2.0,
        admin_key=ADMIN_KEY,
        metrics_listen="127.0.0.1:0",
    )
    return base.replace(**changes)


class RunningServer:
    """An in-process server and what tests need to reach it."""

    def __init__(self, aio: AioLoop, settings: Settings, *, wait_ready: bool = True) -> None:
        self.aio = aio
        self.server = KeystileServer(settings)
        aio.run(self.server.start())
        if wait_ready:
            aio.run(self.server.wait_ready(30))
        self.address = self.server.address
        self.stopped = False

    def client(self, **kwargs: Any) -> keystile.Client:
        """A client; the static admin key unless ``api_key`` says otherwise."""
        kwargs.setdefault("api_key", ADMIN_KEY)
        return keystile.Client(self.address, **kwargs)

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.aio.run(self.server.stop())

    def metrics(self) -> Metrics:
        """The server's /metrics, scraped over HTTP as Prometheus would."""
        return scrape_metrics(f"127.0.0.1:{self.server.metrics_port}")


class Metrics(dict[str, float]):
    """Samples by ``name{label=value,...}``; absent samples read as 0."""

    def __missing__(self, key: str) -> float:
        return 0.0


def scrape_metrics(address: str) -> Metrics:
    """Fetch and parse a Prometheus text exposition."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def eventually(check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> float:
    """Poll ``check`` until it holds; return the seconds it took (fail after ``timeout``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def server(aio: AioLoop, database_url: str) -> Iterator[RunningServer]:
    """The shared server on the session database."""
    running = RunningServer(aio, server_settings(database_url))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def start_server(aio: AioLoop) -> Iterator[Callable[..., RunningServer]]:
    """Start extra in-process servers (stopped at the end of the session if still running)."""
    started: list[RunningServer] = []

    def start(settings: Settings, *, wait_ready: bool = True) -> RunningServer:
        running = RunningServer(aio, settings, wait_ready=wait_ready)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def module_db_url(make_database: Callable[[], str]) -> str:
    """A database of the test module's own: its servers' listeners are the only ones there."""
    return make_database()


@pytest.fixture
def fresh(
    start_server: Callable[..., RunningServer], module_db_url: str
) -> Iterator[Callable[..., RunningServer]]:
    """Start servers of the test's own on ``module_db_url`` (counters from zero), settings changed.

    Each is returned once its cache is armed (its LISTEN connection is up) and its key filter
    loaded, and stopped after the test.
    """
    started: list[RunningServer] = []

    def start(**changes: Any) -> RunningServer:
        settings = server_settings(module_db_url, **changes)
        running = start_server(settings)

        def armed() -> bool:
            metrics = running.metrics()
            filtered = not settings.key_filter or metrics["keystile_key_filter_ready"] == 1
            return metrics["keystile_key_listener_up"] == 1 and filtered

        eventually(armed)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[keystile.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def owner() -> str:
    """A fresh owner id, so that tests sharing the database never see each other's keys."""
    import uuid

    return f"team-{uuid.uuid4().hex[:10]}"


def postgres_for(pgdata: Path) -> list[psutil.Process]:
    """The postgres processes serving ``pgdata``: an embedded server must not outlive keystile."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and str(pgdata) in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, timeout: float = 60) -> None:
    """Poll the standard health service until it answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {address} never became SERVING")
            time.sleep(0.1)


class ServeProcess:
    """`keystile serve` in a subprocess: the command users run."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(cwd or ".") / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        command = [str(BIN / "keystile"), "serve", "--listen", self.address, *args]
        if open_files is not None:
            # The shell sets the limits and execs: a preexec_fn would run after fork() in a
            # process full of gRPC threads, which is not safe.
            soft, hard = open_files
            command = ["sh", "-c", f'ulimit -Sn {soft} && ulimit -Hn {hard} && exec "$0" "$@"', *command]
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KEYSTILE_ADMIN_KEY": ADMIN_KEY, **(env or {})},
            cwd=cwd,
        )

    def wait_serving(self, timeout: float = 60) -> None:
        try:
            wait_serving(self.address, timeout)
        except TimeoutError:
            raise TimeoutError(self.log()) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop_insistently(self, sig: int = signal.SIGTERM, every: float = 0.002, timeout: float = 30) -> int:
        """Send ``sig`` again and again until the process exits, as an impatient process manager does.

        Repeats land in every phase of shutdown, including the last moments after the server
        has stopped, where a default signal disposition would turn a clean exit into a kill.
        """
        deadline = time.monotonic() + timeout
        try:
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(self.log())
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                time.sleep(every)
            return self.proc.returncode
        finally:
            self._log.close()


def run_cli(
    *args: str, input: str | None = None, timeout: float = 30, api_key: str | None = ADMIN_KEY
) -> subprocess.CompletedProcess[str]:
    """Run the installed `keystile` command (as the static admin by default) and capture its output."""
    env = {k: v for k, v in os.environ.items() if k != "KEYSTILE_API_KEY"}
    if api_key:
        env["KEYSTILE_API_KEY"] = api_key
    return subprocess.run(
        [str(BIN / "keystile"), *args], input=input, capture_output=True, text=True, timeout=timeout, env=env
    )
