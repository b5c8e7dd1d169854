"""What a gateway asks and what it is told: the verdict on a request, as HTTP.

Gateways (Envoy's ext_authz today, HTTP forward-auth next) ask about an HTTP request: the key
comes from a header or the query, the required scopes and resource from the route. This module
finds the key, asks the one verification path (``Verifier``) and turns its verdict into an HTTP
answer (status, headers for the upstream, headers for the client, a short JSON body), which each
surface then writes in its own protocol. No rule of verification lives here: only how a verdict
reads over HTTP.

- Allowed: the upstream gets ``x-keystile-key-id``, ``-owner-id`` and ``-scopes`` (the prefix is
  ``--auth-header-prefix``), the credential header is removed (``--auth-strip-credential``), and
  a key with limits adds ``RateLimit-*`` headers to the client's response.
- 401 with ``WWW-Authenticate`` for a missing, malformed, unknown, revoked or expired key; 403 for a
  missing scope or a forbidden resource; 429 with ``Retry-After`` and ``RateLimit-*`` when rate
  limited or out of credits. The body names the reason, never the key.
- An unreachable database is not an answer: it is raised (``StoreUnavailable``), and each surface
  reports it as a failure (gRPC UNAVAILABLE, HTTP 503) so that the gateway's own failure policy
  (Envoy's ``failure_mode_allow``, ``status_on_error``) applies.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .model import LimitStatus, Verification, VerifyResult
from .service import BEARER
from .verification import Requirements, Verifier, requirements

REALM: Final = 'Bearer realm="keystile"'
_BEARER_AS_SENT: Final = "Bearer "
_BEARER_LENGTH: Final = len(BEARER)
MAX_ROUTES: Final = 10_000


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where keys come from and what the upstream is told (``--auth-*`` settings)."""

    key_headers: tuple[str, ...] = ("authorization", "x-api-key")
    key_query: str = ""
    header_prefix: str = "x-keystile-"
    strip_credential: bool = True


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A verdict as HTTP: allowed (with what to tell the upstream) or denied (status, body)."""

    allowed: bool
    status: int
    upstream_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    client_headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    facts: dict[str, str] = field(default_factory=dict)
    """What Envoy's later filters and access logs may read (dynamic metadata)."""


_UNAUTHORIZED: Final = {
    VerifyResult.MALFORMED: "malformed_key",
    VerifyResult.NOT_FOUND: "unknown_key",
    VerifyResult.REVOKED: "revoked_key",
    VerifyResult.EXPIRED: "expired_key",
    VerifyResult.DISABLED: "disabled_key",
}
_FORBIDDEN: Final = {
    VerifyResult.INSUFFICIENT_SCOPE: "insufficient_scope",
    VerifyResult.FORBIDDEN_RESOURCE: "forbidden_resource",
}
_TOO_MANY: Final = {VerifyResult.RATE_LIMITED: "rate_limited", VerifyResult.USAGE_EXCEEDED: "usage_exceeded"}


def find_key(headers: Mapping[str, str], query: str, config: GatewayConfig) -> tuple[str, str]:
    """The presented key and the header it came from ("" for the query, or for none).

    ``headers`` have lower-case names, as HTTP/2 and Envoy give them. ``authorization`` must be
    ``Bearer <key>``; any other header holds the key alone.
    """
    for name in config.key_headers:
        value = headers.get(name)
        if not value:
            continue
        if name == "authorization":
            # "Bearer " as clients write it, without a slice and a lower(); any other case too.
            if not value.startswith(_BEARER_AS_SENT) and value[:_BEARER_LENGTH].lower() != BEARER:
                continue
            value = value[_BEARER_LENGTH:]
        return value.strip(), name
    if config.key_query and query:
        values = urllib.parse.parse_qs(query).get(config.key_query)
        if values and values[0]:
            return values[0], ""
    return "", ""


def split_scopes(text: str) -> list[str]:
    """``"jobs:read, jobs:write"`` as a list (empty items dropped)."""
    return [scope.strip() for scope in text.split(",") if scope.strip()]


class Routes(dict[tuple[str, str], Requirements]):
    """Each route's Requirements by the text the gateway sends: ``routes[(scopes, resource)]``.

    A gateway repeats its few routes' scopes and resource on every request: each is split once
    (a plain dict lookup after that), and at most ``MAX_ROUTES`` are kept.
    """

    def __missing__(self, route: tuple[str, str]) -> Requirements:
        if len(self) >= MAX_ROUTES:
            self.clear()
        required = self[route] = requirements(split_scopes(route[0]), route[1])
        return required


async def decide(
    verifier: Verifier,
    key: str,
    required: Requirements,
    config: GatewayConfig,
    *,
    credential_header: str,
    authorization: str = "",
) -> HttpAnswer:
    """The HTTP answer for a request presenting ``key`` (StoreUnavailable when it cannot be known)."""
    if not key:
        return MISSING_KEY
    verdict = verifier.verify_cached(key.encode(), required)
    if verdict is None:
        verdict = await verifier.verify_key(
            key, required.scopes, required.resource, authorization=authorization
        )
    return answer_for(verdict, config, credential_header)


def answer_for(verdict: Verification, config: GatewayConfig, credential_header: str) -> HttpAnswer:
    """How one verdict reads over HTTP."""
    result = verdict.result
    limit_headers = _limit_headers(verdict.limit) if verdict.limit is not None else {}
    if result is VerifyResult.VALID:
        key = verdict.key
        assert key is not None
        prefix = config.header_prefix
        facts = {"key_id": key.id, "owner_id": key.owner_id, "scopes": ",".join(key.scopes)}
        return HttpAnswer(
            allowed=True,
            status=200,
            upstream_headers={
                f"{prefix}key-id": key.id,
                f"{prefix}owner-id": key.owner_id,
                f"{prefix}scopes": facts["scopes"],
            },
            remove_headers=(credential_header,) if config.strip_credential and credential_header else (),
            client_headers=limit_headers,
            facts=facts,
        )
    if result in _UNAUTHORIZED:
        reason = _UNAUTHORIZED[result]
        return _denied(401, reason, {"www-authenticate": f'{REALM}, error="invalid_token"'})
    if result in _FORBIDDEN:
        reason = _FORBIDDEN[result]
        return _denied(403, reason, {"www-authenticate": f'{REALM}, error="insufficient_scope"'})
    if result in _TOO_MANY:
        headers = dict(limit_headers)
        if verdict.limit is not None and verdict.limit.reset:
            headers["retry-after"] = str(int(verdict.limit.reset))
        return _denied(429, _TOO_MANY[result], headers)
    return _denied(401, "invalid_key", {"www-authenticate": REALM})  # fail closed on anything new


def _limit_headers(limit: LimitStatus) -> dict[str, str]:
    """The IETF draft's RateLimit headers for the limit that decided."""
    headers = {
        "ratelimit-limit": str(limit.limit),
        "ratelimit-remaining": str(limit.remaining),
        "ratelimit-reset": str(int(limit.reset)),
    }
    if limit.window_ms:
        headers["ratelimit-policy"] = f'{limit.limit};w={limit.window_ms // 1000};name="{limit.name}"'
    return headers


def _denied(status: int, reason: str, headers: dict[str, str]) -> HttpAnswer:
    body = json.dumps({"error": reason}).encode()
    return HttpAnswer(
        allowed=False,
        status=status,
        client_headers={**headers, "content-type": "application/json"},
        body=body,
        facts={"reason": reason},
    )


MISSING_KEY: Final = _denied(401, "missing_key", {"www-authenticate": REALM})
"""The answer when no header (or query parameter) carries a key."""
