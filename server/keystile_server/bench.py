"""``keystile bench``'s engine: a VerifyKey load generator to point at any keystile deployment.

Like pgbench or redis-benchmark: N load processes (``--processes``), each holding its own
connection and ``concurrency / processes`` calls in flight, for ``--duration`` seconds after a
warm-up. Requests are serialized once up front and sent as raw bytes, so the generator spends
its CPU on gRPC rather than on protobuf. Latencies go into an HdrHistogram per process (in
microseconds, 3 significant digits) and are merged at the end; a progress line is printed every
second. ``--rpc health`` sends the standard health Check instead: a do-nothing call on the same
server stack, the baseline VerifyKey is compared with. The requests are built in
``bench_requests``, the command in ``bench_command``; ``make bench`` drives this engine too.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from hdrh.histogram import HdrHistogram

from keystile.v1 import keys_pb2

from .processes import run_async

VERIFY_METHOD: Final = "/keystile.v1.KeyService/VerifyKey"
HEALTH_METHOD: Final = "/grpc.health.v1.Health/Check"
CHECK_METHOD: Final = "/envoy.service.auth.v3.Authorization/Check"
_HIGHEST_US: Final = 60_000_000
CONNECT_TIMEOUT: Final = 10.0
"""Seconds a load process waits for its connection before the run fails (instead of hanging)."""
_READY: Final = grpc.ChannelConnectivity.READY
_FAILED: Final = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_RESULT_NAMES: Final[dict[int, str]] = {
    int(value): name.removeprefix("VERIFY_RESULT_").lower() for name, value in keys_pb2.VerifyResult.items()
}


def new_histogram() -> HdrHistogram:
    """Latencies in microseconds, 1 µs to 60 s, 3 significant digits."""
    return HdrHistogram(1, _HIGHEST_US, 3)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send, to where, how hard and for how long."""

    target: str
    requests: Sequence[bytes]
    rpc: str = "verify"
    concurrency: int = 16
    duration: float = 10.0
    processes: int = 1
    warmup: float = 1.0
    cpus: tuple[int, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_pid: int | None = None
    """A local server's process id: its CPU time over the measured window is reported too."""
    rate: float = 0.0
    """Calls per second to offer in all (paced evenly over the calls in flight); 0: as fast as possible."""


@dataclass(slots=True)
class LoadResult:
    """Merged outcome of every load process."""

    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    results: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=new_histogram)
    server_cpu_seconds: float | None = None

    @property
    def server_cpu_us_per_call(self) -> float | None:
        """Server CPU per completed call (needs ``server_pid``), in microseconds."""
        if self.server_cpu_seconds is None or not self.calls:
            return None
        return self.server_cpu_seconds / self.calls * 1e6

    @property
    def rate(self) -> float:
        """Completed calls per second over the measured window."""
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile_ms(self, percentile: float) -> float:
        """Latency at ``percentile`` (0-100), in milliseconds."""
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "calls": self.calls,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "calls_per_second": round(self.rate, 1),
            "latency_ms": {f"p{p:g}": round(self.percentile_ms(p), 3) for p in (50, 90, 99, 99.9)}
            | {"max": round(self.histogram.get_max_value() / 1000, 3)},
            "results": dict(self.results),
            "server_cpu_us_per_call": (
                round(self.server_cpu_us_per_call, 1) if self.server_cpu_us_per_call is not None else None
            ),
            "server_process_busy": (
                round(self.server_cpu_seconds / self.seconds, 3)
                if self.server_cpu_seconds is not None and self.seconds
                else None
            ),
        }


def run_load(spec: LoadSpec, *, progress: Callable[[float, int, int], None] | None = None) -> LoadResult:
    """Run the load and merge every process's counts and histogram.

    ``progress(elapsed, calls, errors)`` is called about once a second with running totals.
    """
    return run_sequence([spec], progress=progress)[0]


def run_sequence(
    specs: Sequence[LoadSpec], *, progress: Callable[[float, int, int], None] | None = None
) -> list[LoadResult]:
    """Run several loads back to back in the same load processes (no start-up between them).

    Made for interleaved comparisons (A, B, A, B, ...): the machine drifts between time windows,
    so variants are only comparable when measured close together. Process count and CPUs are
    taken from the first spec.
    """
    first = specs[0]
    context = multiprocessing.get_context("spawn")
    reports: Any = context.Queue()
    count = first.processes
    procs = [
        context.Process(target=_load_process, args=(list(specs), index, count, reports), daemon=True)
        for index in range(count)
    ]
    for proc in procs:
        proc.start()
    results = [LoadResult() for _ in specs]
    ticks: dict[int, tuple[int, int]] = {}
    done = 0
    started = time.monotonic()
    deadline = started + sum(s.warmup + s.duration + 30 for s in specs) + 30
    try:
        while done < len(procs) * len(specs):
            try:
                message = reports.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline or not any(proc.is_alive() for proc in procs):
                    raise RuntimeError("a load process died or hung; see its output above") from None
                continue
            kind, index = message[:2]
            if kind == "unreachable":  # ("unreachable", index, target, why)
                raise ConnectionError(f"cannot connect to {message[2]}: {message[3]}")
            calls, errors = message[2:4]
            if kind == "tick":
                ticks[index] = (calls, errors)
                if progress is not None:
                    progress(
                        time.monotonic() - started,
                        sum(c for c, _ in ticks.values()),
                        sum(e for _, e in ticks.values()),
                    )
                continue
            position, seconds, named, encoded, cpu = message[4:]
            ticks.pop(index, None)
            result = results[position]
            result.calls += calls
            result.errors += errors
            result.seconds = max(result.seconds, seconds)
            result.results.update(named)
            result.histogram.decode_and_add(encoded)
            if cpu is not None:
                result.server_cpu_seconds = cpu
            done += 1
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return results


def _load_process(specs: list[LoadSpec], index: int, processes: int, reports: Any) -> None:
    if specs[0].cpus:
        os.sched_setaffinity(0, specs[0].cpus)

    async def drive_all() -> None:
        for position, spec in enumerate(specs):
            share = spec.concurrency // processes + (index < spec.concurrency % processes)
            await _drive(spec, index, position, max(1, share), reports)

    run_async(drive_all())


def _channel(spec: LoadSpec) -> grpc.aio.Channel:
    # Each load process opens its own connection (with --workers, the kernel spreads them).
    options = [("grpc.use_local_subchannel_pool", 1)]
    if spec.root_certificates or spec.certificate_chain:
        credentials = grpc.ssl_channel_credentials(
            spec.root_certificates, spec.private_key, spec.certificate_chain
        )
        return grpc.aio.secure_channel(spec.target, credentials, options=options)
    return grpc.aio.insecure_channel(spec.target, options=options)


async def _connect(channel: grpc.aio.Channel) -> str:
    """Connect before the clock starts; "" when connected, else why not.

    Like pgbench, a refused or unresolvable target fails the run at its first failed attempt
    rather than after gRPC's reconnect backoff; a target that never answers (a dropped route)
    fails after CONNECT_TIMEOUT.
    """
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            while state is not _READY:
                if state is _FAILED:
                    return "connection failed"
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return f"no connection within {CONNECT_TIMEOUT:g}s"
    return ""


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _drive(spec: LoadSpec, index: int, position: int, concurrency: int, reports: Any) -> None:
    histogram = new_histogram()
    results: Counter[str] = Counter()
    requests = spec.requests
    verify, check = spec.rpc == "verify", spec.rpc == "check"
    calls = errors = 0
    async with _channel(spec) as channel:
        failure = await _connect(channel)
        if failure:
            reports.put(("unreachable", index, spec.target, failure))
            return
        # No (de)serializers: requests go out as the bytes serialized up front.
        method = {"verify": VERIFY_METHOD, "health": HEALTH_METHOD, "check": CHECK_METHOD}[spec.rpc]
        call = channel.unary_unary(method, None, None)
        metadata = spec.metadata or None
        measure_from = time.perf_counter() + spec.warmup
        stop_at = measure_from + spec.duration

        # With a rate, each of the calls in flight sends its share on a fixed schedule (an open
        # loop, as pgbench --rate): a slow answer delays that worker, not the schedule.
        interval = spec.concurrency / spec.rate if spec.rate else 0.0

        async def worker(offset: int) -> None:
            nonlocal calls, errors
            position = offset
            next_at = time.perf_counter() + interval * offset / concurrency
            while True:
                if interval:
                    pause = next_at - time.perf_counter()
                    if pause > 0:
                        await asyncio.sleep(pause)
                    next_at += interval
                started = time.perf_counter()
                if started >= stop_at:
                    return
                request = requests[position % len(requests)]
                position += concurrency
                try:
                    response = await call(request, metadata=metadata, timeout=10)
                except grpc.RpcError:
                    if started >= measure_from:
                        errors += 1
                    continue
                if started >= measure_from:
                    histogram.record_value(
                        min(_HIGHEST_US, max(1, int((time.perf_counter() - started) * 1e6)))
                    )
                    calls += 1
                    if verify:
                        # Field 1 (result) is serialized first: tag 0x08, then a one-byte varint.
                        results[
                            _RESULT_NAMES.get(response[1] if response[:1] == b"\x08" else -1, "unspecified")
                        ] += 1
                    elif check:
                        results[_http_status(response)] += 1

        async def ticker() -> None:
            while True:
                await asyncio.sleep(1)
                reports.put(("tick", index, calls, errors))

        cpu: list[float] = []

        async def sample_server_cpu() -> None:
            # Only the measured window counts: CPU spent during warm-up is not divided by its calls.
            if spec.server_pid is None or index != 0:
                return
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu.append(_cpu_seconds(spec.server_pid))
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            cpu.append(_cpu_seconds(spec.server_pid))

        ticking = asyncio.create_task(ticker())
        await asyncio.gather(sample_server_cpu(), *(worker(i) for i in range(concurrency)))
        ticking.cancel()
    seconds = max(0.0, min(time.perf_counter(), stop_at) - measure_from)
    named = dict(results)
    server_cpu = cpu[1] - cpu[0] if len(cpu) == 2 else None
    reports.put(("done", index, calls, errors, position, seconds, named, histogram.encode(), server_cpu))


def _http_status(response: bytes) -> str:
    """What Envoy would answer for a serialized CheckResponse: ``http_200``, ``http_401``, ...

    An OK answer starts with an empty status (field 1, tag 0x0A, length 0): read off the bytes,
    so that counting costs the load generator next to nothing (a slower client changes how the
    server's calls batch, and so its CPU per call). Denials are parsed.
    """
    if response[:2] == b"\x0a\x00":
        return "http_200"
    from envoy.service.auth.v3 import external_auth_pb2

    parsed = external_auth_pb2.CheckResponse.FromString(response)
    return f"http_{parsed.denied_response.status.code if parsed.HasField('denied_response') else 200}"
