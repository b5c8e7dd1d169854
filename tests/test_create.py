"""CreateKey: the happy path, every documented bad input, and what gets stored."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from fix_db import Db
from fix_server import ADMIN_KEY
from google.protobuf import duration_pb2, timestamp_pb2

import keystile
from keystile.v1 import keys_pb2


def test_create_returns_key_and_secret_once(client: keystile.Client, owner: str, db: Db) -> None:
    before = datetime.now(UTC)
    response = client.create_key(
        owner,
        "  billing worker  ",
        scopes=["jobs:read", "jobs:write", "jobs:read"],
        resources=["invoices", "refunds"],
        prefix="sk_live",
        ttl=timedelta(hours=1),
        rate_limit_per_minute=600,
        metadata={"env": "prod", "tier": 2, "tags": ["a", "b"], "nested": {"x": True}},
    )
    key, secret = response.key, response.secret
    assert re.fullmatch(keystile.KEY_PATTERN, secret) and secret.startswith("sk_live_")
    assert key.id and key.owner_id == owner
    assert key.name == "billing worker"  # trimmed
    assert key.prefix == "sk_live"
    assert key.secret_hint == secret[: len("sk_live_") + 8]
    assert list(key.scopes) == ["jobs:read", "jobs:write"]  # duplicates removed, order kept
    assert list(key.resources) == ["invoices", "refunds"]
    assert key.rate_limit_per_minute == 600
    assert key.state == keys_pb2.KEY_STATE_ACTIVE
    created = key.create_time.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    expires = key.expire_time.ToDatetime(tzinfo=UTC)
    assert abs((expires - created) - timedelta(hours=1)) < timedelta(seconds=5)
    assert not key.HasField("revoke_time") and not key.HasField("last_used_time")
    meta = dict(key.metadata)
    assert meta["env"] == "prod" and meta["tier"] == 2 and list(meta["tags"]) == ["a", "b"]

    # Only the hash and hint are stored; the secret is nowhere in the row.
    row = db.query("SELECT secret_hash, secret_hint, keys::text FROM keystile.keys WHERE id = %s", (key.id,))[
        0
    ]
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert row[1] == key.secret_hint
    assert secret not in str(row[2]) and secret[len("sk_live_") :] not in str(row[2])

    # GetKey never returns the secret again.
    fetched = client.get_key(key.id)
    assert secret not in str(fetched)
    assert fetched == key


def test_create_minimal_uses_server_default_prefix_and_never_expires(
    client: keystile.Client, owner: str
) -> None:
    response = client.create_key(owner, "minimal")
    assert response.secret.startswith("ks_")
    assert response.key.prefix == "ks"
    assert list(response.key.scopes) == [] and list(response.key.resources) == []
    assert not response.key.HasField("expire_time")
    assert response.key.rate_limit_per_minute == 0


def test_create_with_expire_time(client: keystile.Client, owner: str) -> None:
    when = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    key = client.create_key(owner, "dated", expire_time=when).key
    assert key.expire_time.ToDatetime(tzinfo=UTC) == when


def test_limits_are_inclusive(client: keystile.Client) -> None:
    owner = "o" * 128
    key = client.create_key(
        owner,
        "n" * 200,
        scopes=[f"s{i}:{'x' * 50}" for i in range(64)],
        resources=[f"r{i}" + "y" * 250 for i in range(256)],
        prefix="p" * 16,
        metadata={"blob": "z" * 8000},
    ).key
    assert key.owner_id == owner and len(key.scopes) == 64 and len(key.resources) == 256


def _request(**overrides: Any) -> keys_pb2.CreateKeyRequest:
    fields: dict[str, Any] = {"owner_id": "team-bad-input", "name": "k"}
    fields.update(overrides)
    return keys_pb2.CreateKeyRequest(**fields)


def _past() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    return stamp


BAD_REQUESTS = {
    "missing owner": (_request(owner_id=""), "owner_id"),
    "owner with space": (_request(owner_id="team a"), "owner_id"),
    "owner with slash": (_request(owner_id="team/a"), "owner_id"),
    "owner too long": (_request(owner_id="o" * 129), "owner_id"),
    "missing name": (_request(name=""), "name"),
    "blank name": (_request(name="   \t "), "name"),
    "name too long": (_request(name="n" * 201), "name"),
    "name with newline": (_request(name="evil\nINFO forged log line"), "name"),
    "name with NUL": (_request(name="a\x00b"), "name"),
    "uppercase scope": (_request(scopes=["Jobs:read"]), "scopes[0]"),
    "empty scope": (_request(scopes=["ok", ""]), "scopes[1]"),
    "scope with space": (_request(scopes=["jobs read"]), "scopes[0]"),
    "scope trailing colon": (_request(scopes=["jobs:"]), "scopes[0]"),
    "scope inner wildcard": (_request(scopes=["*:read"]), "scopes[0]"),
    "scope too long": (_request(scopes=["s" * 65]), "scopes[0]"),
    "too many scopes": (_request(scopes=[f"s{i}" for i in range(65)]), "scopes"),
    "empty resource": (_request(resources=[""]), "resources[0]"),
    "resource too long": (_request(resources=["r" * 257]), "resources[0]"),
    "resource with control char": (_request(resources=["a\tb"]), "resources[0]"),
    "too many resources": (_request(resources=[f"r{i}" for i in range(257)]), "resources"),
    "uppercase prefix": (_request(prefix="SK"), "prefix"),
    "prefix starting with digit": (_request(prefix="1sk"), "prefix"),
    "prefix too long": (_request(prefix="p" * 17), "prefix"),
    "prefix with dash": (_request(prefix="sk-live"), "prefix"),
    "zero ttl": (_request(ttl=duration_pb2.Duration(seconds=0)), "ttl"),
    "negative ttl": (_request(ttl=duration_pb2.Duration(seconds=-60)), "ttl"),
    "expire_time in the past": (_request(expire_time=_past()), "expire_time"),
    "expire_time out of range": (
        _request(expire_time=timestamp_pb2.Timestamp(seconds=10**12)),
        "expire_time",
    ),
    "metadata too large": (_request(), "metadata"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
@pytest.mark.usefixtures("unchanged")
def test_bad_create_requests_are_rejected_and_write_nothing(server: Any, case: str) -> None:
    request, field = BAD_REQUESTS[case]
    if case == "metadata too large":
        request.metadata.update({"blob": "z" * 8200})
    from keystile.v1 import keys_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = keys_pb2_grpc.KeyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateKey(request, timeout=5, metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
    error = keystile._errors.from_rpc_error(info.value)
    assert isinstance(error, keystile.InvalidArgumentError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT" and error.domain == "keystile.dev"
    assert field in error.field_violations, error.field_violations
    assert error.field_violations[field]  # a human-readable description


@pytest.mark.usefixtures("unchanged")
def test_every_bad_field_is_reported_at_once(client: keystile.Client) -> None:
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.create_key("bad owner", "", scopes=["BAD"], prefix="9", ttl=-5)
    assert set(info.value.field_violations) == {"owner_id", "name", "scopes[0]", "prefix", "ttl"}


def test_metadata_with_non_finite_number_is_rejected(client: keystile.Client, db: Db) -> None:
    before = db.snapshot()
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.create_key("team-nan", "nan", metadata={"x": float("nan")})
    assert "metadata" in info.value.field_violations
    assert db.snapshot() == before
