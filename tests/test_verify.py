"""VerifyKey: every result, the order of the checks, scope rules, and usage recording."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from fix_db import Db
from fix_server import server_settings

import keystile
from keystile._format import generate_key
from keystile.v1 import keys_pb2

R = keys_pb2


def _verify(
    client: keystile.Client, secret: str, *scopes: str, resource: str = ""
) -> keys_pb2.VerifyKeyResponse:
    return client.verify_key(secret, required_scopes=scopes, resource=resource)


def test_valid_key(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"], resources=["r1"])
    response = _verify(client, created.secret, "jobs:read", resource="r1")
    assert response.result == R.VERIFY_RESULT_VALID
    assert response.key.id == created.key.id and response.key.owner_id == owner
    assert response.key.state == R.KEY_STATE_ACTIVE


@pytest.mark.parametrize(
    "presented",
    ["", "garbage", "Bearer ks_abc", "ks_" + "a" * 49, "x" * 100_000, "ks_" + "a" * 43 + "\u00e9" * 6],
)
def test_malformed(client: keystile.Client, presented: str) -> None:
    response = _verify(client, presented)
    assert response.result == R.VERIFY_RESULT_MALFORMED
    assert not response.HasField("key")


def test_bad_checksum_is_malformed(client: keystile.Client, owner: str) -> None:
    secret = client.create_key(owner, "svc").secret
    typo = secret[:-7] + ("A" if secret[-7] != "A" else "B") + secret[-6:]
    assert _verify(client, typo).result == R.VERIFY_RESULT_MALFORMED


def test_well_formed_unknown_key_is_not_found(client: keystile.Client) -> None:
    response = _verify(client, generate_key("ks"))
    assert response.result == R.VERIFY_RESULT_NOT_FOUND
    assert not response.HasField("key")


def test_revoked(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"])
    client.revoke_key(created.key.id)
    response = _verify(client, created.secret, "jobs:read")
    assert response.result == R.VERIFY_RESULT_REVOKED
    assert response.key.state == R.KEY_STATE_REVOKED


def test_expired(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", ttl=timedelta(seconds=1))
    assert _verify(client, created.secret).result == R.VERIFY_RESULT_VALID
    time.sleep(1.1)
    response = _verify(client, created.secret)
    assert response.result == R.VERIFY_RESULT_EXPIRED
    assert response.key.state == R.KEY_STATE_EXPIRED


def test_insufficient_scope(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", scopes=["jobs:read"])
    response = _verify(client, created.secret, "jobs:read", "jobs:write")
    assert response.result == R.VERIFY_RESULT_INSUFFICIENT_SCOPE
    assert response.key.id == created.key.id


def test_forbidden_resource(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", resources=["invoices"])
    assert _verify(client, created.secret, resource="invoices").result == R.VERIFY_RESULT_VALID
    response = _verify(client, created.secret, resource="payroll")
    assert response.result == R.VERIFY_RESULT_FORBIDDEN_RESOURCE
    assert response.key.id == created.key.id


def test_unrestricted_key_allows_any_resource(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc")
    assert _verify(client, created.secret, resource="anything/at:all").result == R.VERIFY_RESULT_VALID


def test_check_order(client: keystile.Client, owner: str) -> None:
    # Revoked wins over expired, scopes and resources.
    revoked = client.create_key(owner, "r", scopes=["a"], resources=["x"], ttl=timedelta(seconds=1))
    client.revoke_key(revoked.key.id)
    # Expired wins over scopes and resources.
    expired = client.create_key(owner, "e", scopes=["a"], resources=["x"], ttl=timedelta(seconds=1))
    # Scope is checked before resource.
    scoped = client.create_key(owner, "s", scopes=["a"], resources=["x"])
    time.sleep(1.1)
    assert _verify(client, revoked.secret, "b", resource="y").result == R.VERIFY_RESULT_REVOKED
    assert _verify(client, expired.secret, "b", resource="y").result == R.VERIFY_RESULT_EXPIRED
    assert _verify(client, scoped.secret, "b", resource="y").result == R.VERIFY_RESULT_INSUFFICIENT_SCOPE
    assert _verify(client, scoped.secret, "a", resource="y").result == R.VERIFY_RESULT_FORBIDDEN_RESOURCE


@pytest.mark.parametrize(
    ("granted", "required", "valid"),
    [
        (["admin"], ["jobs:read", "keys:write", "anything:at:all"], True),
        (["jobs:*"], ["jobs:read", "jobs:write", "jobs:read:own"], True),
        (["jobs:*"], ["jobs"], False),
        (["jobs:*"], ["jobsx:read"], False),
        (["jobs:read"], ["jobs:read:own"], False),
        (["jobs:read"], ["jobs:write"], False),
        (["jobs:read", "keys:read"], ["keys:read", "jobs:read"], True),
        (["a:b:*"], ["a:b:c"], True),
        (["a:b:*"], ["a:c"], False),
        ([], [], True),
        ([], ["jobs:read"], False),
        (["jobs:read"], ["jobs:*"], False),
        (["jobs:*"], ["jobs:*"], True),
    ],
)
def test_scope_coverage(
    client: keystile.Client, owner: str, granted: list[str], required: list[str], valid: bool
) -> None:
    secret = client.create_key(owner, "svc", scopes=granted).secret
    expected = R.VERIFY_RESULT_VALID if valid else R.VERIFY_RESULT_INSUFFICIENT_SCOPE
    assert _verify(client, secret, *required).result == expected


@pytest.mark.parametrize(
    ("scopes", "resource", "field"),
    [
        (["BAD"], "", "required_scopes[0]"),
        (["ok", "no spaces"], "", "required_scopes[1]"),
        ([f"s{i}" for i in range(65)], "", "required_scopes"),
        ([], "r" * 257, "resource"),
        ([], "a\nb", "resource"),
    ],
)
def test_bad_verify_requests_are_invalid_argument(
    client: keystile.Client, owner: str, scopes: list[str], resource: str, field: str
) -> None:
    secret = client.create_key(owner, "svc").secret
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.verify_key(secret, required_scopes=scopes, resource=resource)
    assert field in info.value.field_violations


def test_last_used_time_is_recorded_at_most_once_a_minute(
    client: keystile.Client, owner: str, db: Db, start_server: Any, database_url: str
) -> None:
    created = client.create_key(owner, "svc", scopes=["a"])
    assert not client.get_key(created.key.id).HasField("last_used_time")
    # A refused verification is not a use.
    _verify(client, created.secret, "b")
    time.sleep(0.4)
    assert not client.get_key(created.key.id).HasField("last_used_time")
    _verify(client, created.secret, "a")
    deadline = time.monotonic() + 5
    while not client.get_key(created.key.id).HasField("last_used_time"):
        assert time.monotonic() < deadline, "last_used_time never written"
        time.sleep(0.05)
    first = client.get_key(created.key.id).last_used_time
    for _ in range(5):
        _verify(client, created.secret, "a")
    time.sleep(0.4)  # several flush intervals
    assert client.get_key(created.key.id).last_used_time == first
    # A second server process has no memory of that write; the SQL still refuses a second write
    # within the minute, so several servers together write each key at most once a minute.
    db.execute(
        "UPDATE keystile.keys SET last_used_time = now() - interval '30 seconds' WHERE id = %s",
        (created.key.id,),
    )
    marked = db.scalar("SELECT last_used_time FROM keystile.keys WHERE id = %s", (created.key.id,))
    other = start_server(server_settings(database_url))
    try:
        with other.client() as second:
            assert _verify(second, created.secret, "a").result == R.VERIFY_RESULT_VALID
        time.sleep(0.5)
        assert (
            db.scalar("SELECT last_used_time FROM keystile.keys WHERE id = %s", (created.key.id,)) == marked
        )
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("fields", "only_the_key"),
    [
        ({"key": "ks_" + "a" * 49}, True),
        ({"key": "sk_live_" + "Z" * 49}, True),
        ({"key": "ks_" + "\u00e9" * 40}, True),  # the UTF-8 bytes, as they came
        ({"key": "k" * 127}, True),
        ({"key": "k" * 128}, False),  # a two-byte length: parsed in full
        ({"key": "ks_x", "required_scopes": ["jobs:read"]}, False),
        ({"key": "ks_x", "resource": "r"}, False),
        ({"required_scopes": ["jobs:read"]}, False),
        ({}, False),
    ],
)
def test_a_request_naming_only_a_key_is_read_off_the_wire(fields: dict[str, Any], only_the_key: bool) -> None:
    from keystile_server.handlers import key_only

    wire = keys_pb2.VerifyKeyRequest(**fields).SerializeToString()
    assert key_only(wire) == (fields["key"].encode() if only_the_key else None)
    # Whatever follows the key, known or unknown, keeps a request off the short path.
    assert key_only(wire + b"\x1a\x01r") is None
    assert key_only(wire + b"\xf8\x07\x01") is None


@pytest.mark.parametrize(
    "wire",
    [b"\x0a\x02\xff\xfe", b"\x0a\x05ab", b"\xff\xff", b"\x0a\x03ks_\x12\x02\xc3"],
    ids=["bad-utf8-key", "truncated", "garbage", "bad-utf8-scope"],
)
def test_an_unparsable_verify_request_is_invalid_argument(server: Any, wire: bytes) -> None:
    """Not a stack trace in an UNKNOWN status: the same mapping as every other bad request."""
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/keystile.v1.KeyService/VerifyKey", None, None)
        with pytest.raises(grpc.RpcError) as caught:
            call(wire, timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert info.reason == "INVALID_ARGUMENT" and info.domain == "keystile.dev"
    assert "DecodeError" not in error.details() and "parsing" not in error.details()  # type: ignore[attr-defined]


def test_repeated_requests_follow_every_change(client: keystile.Client, owner: str) -> None:
    """A request seen before is answered by its remembered shape: it must still see revocation,
    and a bad request never becomes a remembered one."""
    created = client.create_key(owner, "svc", scopes=["jobs:read"], resources=["r1"])
    for _ in range(3):
        assert _verify(client, created.secret, "jobs:read", resource="r1").result == R.VERIFY_RESULT_VALID
        assert _verify(client, created.secret, "jobs:write").result == R.VERIFY_RESULT_INSUFFICIENT_SCOPE
        with pytest.raises(keystile.InvalidArgumentError):
            _verify(client, created.secret, "Not A Scope")
        with pytest.raises(keystile.InvalidArgumentError):
            client.verify_key(created.secret, cost=5000)
    client.revoke_key(created.key.id)
    assert _verify(client, created.secret, "jobs:read", resource="r1").result == R.VERIFY_RESULT_REVOKED


def test_the_verification_hash_is_the_stored_one() -> None:
    """The verification path's SHA-256 (the interpreter's own) gives the digest keys are stored under."""
    import hashlib

    from keystile_server.fast_hash import sha256

    for data in (b"", b"ks_" + b"a" * 49, keystile.generate_key("ks").encode(), bytes(range(256)) * 3):
        assert sha256(data).digest() == hashlib.sha256(data).digest() == keystile.hash_key(data)
    assert sha256.__module__ != "_hashlib"  # the built-in, not OpenSSL's (this CPython has one)
