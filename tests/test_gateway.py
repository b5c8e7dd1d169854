"""What the gateway surfaces remember: each route's requirements, and Envoy's serialized answers.

Both are caps (every cap has a test). The Check servicer is driven directly on the test server's
domain service with requests shaped like Envoy's (``keystile_server.bench_requests.check_requests``): the
real Envoy path is tested in test_envoy.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from fix_server import RunningServer
from google.rpc import code_pb2

import keystile
from keystile_server import ext_authz, gateway
from keystile_server.bench_requests import check_requests
from keystile_server.gateway import GatewayConfig, Routes


class _Context:
    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()


def test_a_route_is_split_once_and_reused() -> None:
    routes = Routes()
    first = routes[("jobs:read, jobs:write,,", "project-42")]
    assert first.scopes == ("jobs:read", "jobs:write") and first.resource == "project-42"
    assert routes[("jobs:read, jobs:write,,", "project-42")] is first
    assert routes[("", "")].memo_key is None  # nothing required: the key-only memo


def test_routes_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "MAX_ROUTES", 3)
    routes = Routes()
    for i in range(10):
        assert routes[(f"s:{i}", "")].scopes == (f"s:{i}",)
        assert len(routes) <= 3


def test_memoized_answers_are_capped_and_stay_each_keys_own(
    server: RunningServer, client: keystile.Client, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ext_authz, "_MAX_ANSWERS", 2)
    servicer = ext_authz.EnvoyAuthorization(server.server._handlers, GatewayConfig())
    created = [client.create_key(owner, f"k{i}", scopes=["jobs:read"]) for i in range(5)]
    requests = check_requests([c.secret for c in created], scopes="jobs:read")
    for _ in range(3):  # the first round fills the cache; the others are answered from memos
        for made, request in zip(created, requests, strict=True):
            parsed = external_auth_pb2.CheckRequest.FromString(request)
            answer = external_auth_pb2.CheckResponse.FromString(
                server.aio.run(servicer.Check(parsed, _Context()))  # type: ignore[arg-type]
            )
            assert answer.status.code == code_pb2.OK
            upstream = {h.header.key: h.header.value for h in answer.ok_response.headers}
            assert upstream["x-keystile-key-id"] == made.key.id
            assert len(servicer._answers) <= 2
