"""What ``keystile bench`` and ``make bench`` send: requests serialized once, up front.

The no-op (the health Check), VerifyKey requests, and Envoy CheckRequests shaped like the ones a
real Envoy sends; and the mix of valid, unknown, malformed and revoked keys ``--mix`` asks for.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from typing import Final

from grpc_health.v1 import health_pb2

from keystile import generate_key
from keystile.v1 import keys_pb2

MIX_KINDS: Final = ("valid", "unknown", "malformed", "revoked")


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
