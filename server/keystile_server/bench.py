"""``keystile bench``: a VerifyKey load generator to point at any keystile deployment.

Like pgbench or redis-benchmark: N load processes (``--processes``), each holding its own
connection and ``concurrency / processes`` calls in flight, for ``--duration`` seconds after a
warm-up. Requests are serialized once up front and sent as raw bytes, so the generator spends
its CPU on gRPC rather than on protobuf. Latencies go into an HdrHistogram per process (in
microseconds, 3 significant digits) and are merged at the end; a progress line is printed every
second. ``--rpc health`` sends the standard health Check instead: a do-nothing call on the same
server stack, the baseline VerifyKey is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import grpc
from grpc_health.v1 import health_pb2
from hdrh.histogram import HdrHistogram

from keystile import Client, generate_key
from keystile.v1 import keys_pb2

from .processes import run_async

VERIFY_METHOD: Final = "/keystile.v1.KeyService/VerifyKey"
HEALTH_METHOD: Final = "/grpc.health.v1.Health/Check"
CHECK_METHOD: Final = "/envoy.service.auth.v3.Authorization/Check"
MIX_KINDS: Final = ("valid", "unknown", "malformed", "revoked")
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


def health_requests() -> list[bytes]:
    """The no-op baseline's request."""
    return [health_pb2.HealthCheckRequest().SerializeToString()]


def check_requests(keys: Sequence[str], *, scopes: str = "", all_headers: bool = True) -> list[bytes]:
    """One serialized Envoy CheckRequest per key, shaped as a real Envoy 1.40 sends it for a GET.

    Copied field by field from a CheckRequest captured from Envoy (peers, the request's time, id
    and protocol, and every header: pseudo-headers and those curl and Envoy add), so that the
    bench pays the parsing a real Check pays. ``all_headers=False`` is what Envoy sends with the
    filter's ``allowed_headers`` limited to the credential headers (docs/GATEWAYS.md).
    """
    from envoy.service.auth.v3 import external_auth_pb2

    requests = []
    for index, key in enumerate(keys):
        request = external_auth_pb2.CheckRequest()
        attributes = request.attributes
        attributes.source.address.socket_address.address = "10.0.3.17"
        attributes.source.address.socket_address.port_value = 40000 + index % 20000
        attributes.destination.address.socket_address.address = "10.0.3.2"
        attributes.destination.address.socket_address.port_value = 10000
        attributes.request.time.FromNanoseconds(1_764_633_600_000_000_000 + index * 1000)
        http = attributes.request.http
        http.id = str(10_000_000_000_000_000 + index)
        http.method, http.path, http.host = "GET", "/jobs/1?page=2", "api.example.com"
        http.scheme, http.protocol = "http", "HTTP/1.1"
        http.headers["authorization"] = f"Bearer {key}"
        if all_headers:
            http.headers.update(
                {
                    "x-request-id": str(uuid.UUID(int=index, version=4)),
                    "x-forwarded-proto": "http",
                    "user-agent": "curl/8.11.1",
                    "accept": "*/*",
                    "accept-encoding": "identity",
                    ":scheme": "http",
                    ":path": "/jobs/1?page=2",
                    ":method": "GET",
                    ":authority": "api.example.com",
                }
            )
        if scopes:
            attributes.context_extensions["keystile.scopes"] = scopes
        attributes.metadata_context.SetInParent()
        attributes.route_metadata_context.SetInParent()
        requests.append(request.SerializeToString())
    return requests


def verify_requests(keys: Sequence[str], *, scopes: Sequence[str] = ()) -> list[bytes]:
    """One serialized VerifyKeyRequest per key, in order."""
    return [keys_pb2.VerifyKeyRequest(key=k, required_scopes=scopes).SerializeToString() for k in keys]


def parse_mix(text: str) -> dict[str, int]:
    """``valid=90,unknown=5,malformed=5`` as weights; unknown kinds and bad numbers are errors."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        if kind not in MIX_KINDS or not sep or not weight.isdigit():
            raise ValueError(f"--mix: {part!r} is not KIND=WEIGHT with KIND one of {', '.join(MIX_KINDS)}")
        mix[kind] = int(weight)
    if not mix or sum(mix.values()) == 0:
        raise ValueError("--mix: at least one weight must be positive")
    return mix


def mixed_keys(
    mix: dict[str, int], valid: Sequence[str], revoked: Sequence[str], *, size: int = 1000
) -> list[str]:
    """``size`` secrets in the proportions of ``mix``, shuffled (deterministically)."""
    total = sum(mix.values())
    rng = random.Random(0)  # noqa: S311 - a reproducible order, not a secret
    keys: list[str] = []
    for kind, weight in mix.items():
        count = math.ceil(size * weight / total)
        if kind == "valid":
            keys += [valid[i % len(valid)] for i in range(count)]
        elif kind == "revoked":
            keys += [revoked[i % len(revoked)] for i in range(count)]
        elif kind == "unknown":
            keys += [generate_key("ks") for _ in range(count)]
        else:
            keys += [f"ks_not-a-key-{i}" for i in range(count)]
    rng.shuffle(keys)
    return keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``keystile bench`` flags (target, TLS, key and --json come from the shared client options)."""
    parser.add_argument(
        "--rpc",
        choices=("verify", "check", "health"),
        default="verify",
        help="what to call: VerifyKey, Envoy's ext_authz Check (route scope bench:verify), or the no-op",
    )
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="calls in flight in total")
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--processes", "-p", type=int, default=1, help="load processes (one connection each)")
    parser.add_argument(
        "--mix", default="valid=100", help="weights of valid, unknown, malformed and revoked keys"
    )
    parser.add_argument("--keys", type=int, default=100, help="valid keys to create for the run")
    parser.add_argument("--owner", default="keystile-bench", help="owner of the keys the run creates")
    parser.add_argument("--keep-keys", action="store_true", help="do not revoke the run's keys afterwards")
    parser.add_argument("--cpus", default="", help="pin load processes to these CPUs, such as 1 or 2,3")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="calls per second to offer, paced (default: as fast as possible)",
    )


def run_command(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``keystile bench``: create keys as the mix needs, run the load, report, clean up."""
    if args.concurrency < 1 or args.processes < 1 or args.duration <= 0 or args.keys < 1:
        raise ValueError("--concurrency, --processes, --keys and --duration must be positive")
    if args.rate < 0:
        raise ValueError("--rate must not be negative")
    mix = parse_mix(args.mix)
    cpus = tuple(int(c) for c in args.cpus.split(",") if c.strip())
    created: list[str] = []
    valid: list[str] = []
    revoked: list[str] = []
    try:
        if args.rpc != "health":
            for _ in range(args.keys if mix.get("valid") else 0):
                response = client.create_key(args.owner, "bench", scopes=["bench:verify"])
                created.append(response.key.id)
                valid.append(response.secret)
            for _ in range(min(args.keys, 10) if mix.get("revoked") else 0):
                response = client.create_key(args.owner, "bench-revoked")
                client.revoke_key(response.key.id, reason="keystile bench")
                revoked.append(response.secret)
            keys = mixed_keys(mix, valid, revoked)
            if args.rpc == "check":
                requests = check_requests(keys, scopes="bench:verify")
            else:
                requests = verify_requests(keys)
        else:
            requests = health_requests()
        spec = LoadSpec(
            target=args.target,
            requests=requests,
            rpc=args.rpc,
            concurrency=args.concurrency,
            duration=args.duration,
            processes=args.processes,
            warmup=args.warmup,
            cpus=cpus,
            rate=args.rate,
            metadata=(("authorization", f"Bearer {args.api_key}"),) if args.api_key else (),
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        show = sys.stderr.isatty() and not args.json
        result = run_load(spec, progress=_progress_line if show else None)
        if show:
            sys.stderr.write("\n")
    finally:
        if not args.keep_keys:
            for key_id in created:
                client.revoke_key(key_id, reason="keystile bench finished")
    report = {
        "target": args.target,
        "rpc": args.rpc,
        "mix": mix if args.rpc != "health" else {},
        "concurrency": args.concurrency,
        "processes": args.processes,
    } | result.summary()
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(format_report(report))
    return 0 if result.errors == 0 else 1


def _progress_line(elapsed: float, calls: int, errors: int) -> None:
    sys.stderr.write(f"\r  {elapsed:5.1f}s  {calls:>10,} calls  {errors:,} errors")
    sys.stderr.flush()


def format_report(report: dict[str, Any]) -> str:
    """The human-readable result."""
    latency = report["latency_ms"]
    lines = [
        f"target       {report['target']}  rpc {report['rpc']}  concurrency {report['concurrency']}"
        f"  processes {report['processes']}",
        f"calls        {report['calls']:,} in {report['seconds']:.1f}s = {report['calls_per_second']:,.0f}/s"
        f"  errors {report['errors']:,}",
        "latency ms   " + "  ".join(f"{name} {value:.2f}" for name, value in latency.items()),
    ]
    if report["results"]:
        lines.append("results      " + "  ".join(f"{k} {v:,}" for k, v in sorted(report["results"].items())))
    return "\n".join(lines) + "\n"
