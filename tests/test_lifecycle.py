"""GetKey, ListKeys (keyset pagination) and RevokeKey."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from fix_db import Db
from fix_server import ADMIN_KEY

import keystile
from keystile.v1 import keys_pb2


def test_get_key_returns_the_stored_key(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "reader", scopes=["keys:read"]).key
    assert client.get_key(created.id) == created


@pytest.mark.parametrize("key_id", [str(uuid.uuid4()), "not-a-uuid", "key_123", "x" * 128])
def test_get_unknown_id_is_not_found(client: keystile.Client, key_id: str) -> None:
    with pytest.raises(keystile.NotFoundError) as info:
        client.get_key(key_id)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.reason == "KEY_NOT_FOUND" and info.value.domain == "keystile.dev"


@pytest.mark.parametrize(("key_id", "why"), [("", "is required"), ("x" * 129, "at most")])
def test_get_invalid_id_is_invalid_argument(client: keystile.Client, key_id: str, why: str) -> None:
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.get_key(key_id)
    assert why in info.value.field_violations["id"]


def test_list_newest_first_and_only_active_by_default(client: keystile.Client, owner: str) -> None:
    ids = [client.create_key(owner, f"k{i}").key.id for i in range(4)]
    revoked = client.revoke_key(ids[1]).id
    expiring = client.create_key(owner, "short", ttl=timedelta(seconds=1)).key.id
    client.create_key("someone-else", "not mine")
    time.sleep(1.2)
    active = [k.id for k in client.list_keys(owner).keys]
    assert active == [ids[3], ids[2], ids[0]]
    everything = client.list_keys(owner, include_inactive=True).keys
    assert [k.id for k in everything] == [expiring, ids[3], ids[2], ids[1], ids[0]]
    states = {k.id: k.state for k in everything}
    assert states[revoked] == keys_pb2.KEY_STATE_REVOKED
    assert states[expiring] == keys_pb2.KEY_STATE_EXPIRED


def test_list_default_page_size_is_50(client: keystile.Client, owner: str) -> None:
    for i in range(51):
        client.create_key(owner, f"k{i}")
    page = client.list_keys(owner)
    assert len(page.keys) == 50 and page.next_page_token
    rest = client.list_keys(owner, page_token=page.next_page_token)
    assert len(rest.keys) == 1 and rest.next_page_token == ""


def test_list_unknown_owner_is_empty(client: keystile.Client) -> None:
    page = client.list_keys("nobody-here")
    assert list(page.keys) == [] and page.next_page_token == ""


def test_pagination_is_stable_under_concurrent_inserts(server: object, owner: str) -> None:
    address = server.address  # type: ignore[attr-defined]
    with keystile.Client(address, api_key=ADMIN_KEY) as client:
        original = [client.create_key(owner, f"k{i}").key.id for i in range(23)]
        stop = threading.Event()
        inserted: list[str] = []

        def insert() -> None:
            with keystile.Client(address, api_key=ADMIN_KEY) as writer:
                while not stop.is_set():
                    inserted.append(writer.create_key(owner, "concurrent").key.id)

        thread = threading.Thread(target=insert)
        thread.start()
        try:
            seen: list[str] = []
            token = ""
            pages = 0
            while True:
                page = client.list_keys(owner, page_size=5, page_token=token)
                seen.extend(k.id for k in page.keys)
                pages += 1
                time.sleep(0.02)  # let the writer insert between pages
                token = page.next_page_token
                if not token:
                    break
        finally:
            stop.set()
            thread.join()
    assert len(inserted) > 0
    assert len(seen) == len(set(seen)), "a key appeared twice"
    original_seen = [i for i in seen if i in set(original)]
    assert original_seen == list(reversed(original)), "a pre-existing key was skipped or reordered"
    assert pages >= 5


@pytest.mark.parametrize("page_size", [-1, 501, 10_000])
@pytest.mark.usefixtures("unchanged")
def test_list_bad_page_size(client: keystile.Client, page_size: int) -> None:
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.list_keys("team-x", page_size=page_size)
    assert "page_size" in info.value.field_violations


def test_list_page_size_limits_are_inclusive(client: keystile.Client, owner: str) -> None:
    client.create_key(owner, "one")
    client.create_key(owner, "two")
    assert len(client.list_keys(owner, page_size=1).keys) == 1
    assert len(client.list_keys(owner, page_size=500).keys) == 2


@pytest.mark.parametrize("owner_id", ["has space", "o" * 129])
def test_list_requires_valid_owner(client: keystile.Client, owner_id: str) -> None:
    """Also "" for a non-admin (an admin's "" lists every owner: test_key_lifecycle.py)."""
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.list_keys(owner_id)
    assert "owner_id" in info.value.field_violations


def _tamper(token: str) -> list[str]:
    payload, mac = token.split(".")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    forged = base64.urlsafe_b64encode(raw.replace(b'"a":false', b'"a":true ')).rstrip(b"=").decode()
    flipped_mac = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    return [
        "garbage",
        token + "x",
        token[:-2],
        f"{forged}.{mac}",
        f"{payload}.{flipped_mac}",
        base64.urlsafe_b64encode(b'{"o":"x","a":false,"t":"2020-01-01T00:00:00+00:00","k":"1"}').decode(),
        ".",
    ]


def test_tampered_or_foreign_page_tokens_are_invalid(client: keystile.Client, owner: str) -> None:
    for i in range(3):
        client.create_key(owner, f"k{i}")
    token = client.list_keys(owner, page_size=1).next_page_token
    assert token
    for bad in _tamper(token):
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.list_keys(owner, page_size=1, page_token=bad)
        assert info.value.reason == "INVALID_PAGE_TOKEN"
        assert "page_token" in info.value.field_violations
    # A token from another owner's listing, or another filter, is foreign here.
    with pytest.raises(keystile.InvalidArgumentError):
        client.list_keys("another-owner", page_size=1, page_token=token)
    with pytest.raises(keystile.InvalidArgumentError):
        client.list_keys(owner, page_size=1, page_token=token, include_inactive=True)
    # The genuine token still works, with any page size.
    assert len(client.list_keys(owner, page_size=10, page_token=token).keys) == 2


def test_revoke_is_idempotent_and_keeps_first_time_and_reason(client: keystile.Client, owner: str) -> None:
    key = client.create_key(owner, "to revoke").key
    first = client.revoke_key(key.id, reason="leaked in CI logs")
    assert first.state == keys_pb2.KEY_STATE_REVOKED
    assert first.HasField("revoke_time") and first.revoke_reason == "leaked in CI logs"
    time.sleep(0.05)
    again = client.revoke_key(key.id, reason="second attempt")
    assert again.revoke_time == first.revoke_time
    assert again.revoke_reason == "leaked in CI logs"
    assert client.get_key(key.id) == again


def test_revoke_without_reason(client: keystile.Client, owner: str) -> None:
    key = client.revoke_key(client.create_key(owner, "k").key.id)
    assert key.state == keys_pb2.KEY_STATE_REVOKED and key.revoke_reason == ""


@pytest.mark.usefixtures("unchanged")
def test_revoke_unknown_is_not_found(client: keystile.Client) -> None:
    with pytest.raises(keystile.NotFoundError):
        client.revoke_key(str(uuid.uuid4()), reason="x")
    with pytest.raises(keystile.NotFoundError):
        client.revoke_key("nope")


def test_revoke_bad_reason_changes_nothing(client: keystile.Client, owner: str, db: Db) -> None:
    key = client.create_key(owner, "k").key
    before = db.snapshot()
    for reason, why in [("r" * 501, "at most"), ("line\nbreak", "control")]:
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.revoke_key(key.id, reason=reason)
        assert why in info.value.field_violations["reason"]
    with pytest.raises(keystile.InvalidArgumentError):
        client.revoke_key("", reason="x")
    assert db.snapshot() == before
    assert client.get_key(key.id).state == keys_pb2.KEY_STATE_ACTIVE
    assert client.revoke_key(key.id, reason="r" * 500).revoke_reason == "r" * 500


@pytest.mark.parametrize(
    "value",
    [
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 22, 9, 0, 0, 123456, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 1, 3, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ],
)
def test_key_timestamps_match_protobufs_own_conversion(value: datetime) -> None:
    """Responses set Timestamps with a fast path of our own; it must agree with FromDatetime."""
    from google.protobuf import timestamp_pb2

    from keystile_server.wire import set_timestamp

    expected, ours = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    set_timestamp(ours, value)
    assert (ours.seconds, ours.nanos) == (expected.seconds, expected.nanos)
