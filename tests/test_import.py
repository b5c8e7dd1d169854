"""ImportKeys, legacy key formats, and CreateKey with a caller-minted hash.

The five legacy table shapes and their recipes are in test_migrating.py; the role matrix for
ImportKeys is in test_auth.py.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fix_db import Db
from fix_server import RunningServer, run_cli, server_settings
from google.protobuf import timestamp_pb2

import keystile
from keystile.v1 import keys_pb2
from keystile_server.key_formats import KeyFormats, parse_legacy_formats

V = keys_pb2


def _imported(owner: str, secret: str, **fields: object) -> keys_pb2.ImportedKey:
    digest = keystile.hash_key(secret).hex()
    return keys_pb2.ImportedKey(secret_hash=digest, owner_id=owner, name="moved", **fields)  # type: ignore[arg-type]


def test_each_row_is_imported_or_refused_on_its_own(client: keystile.Client, owner: str, db: Db) -> None:
    existing = client.create_key(owner, "already here")
    good = "old_" + os.urandom(16).hex()
    rows = [
        _imported(owner, good, scopes=["jobs:read"], secret_hint=good[:8], prefix="old"),
        _imported("bad owner!", "old_x"),
        keys_pb2.ImportedKey(secret_hash="not a hash", owner_id=owner, name="bad hash"),
        _imported(owner, good),  # the same hash again, in the same batch
        _imported(owner, existing.secret),  # a hash already stored
        _imported(owner, "old_y", create_time=timestamp_pb2.Timestamp(seconds=2**62)),
        _imported(owner, "old_z", revoke_reason="no time"),
    ]
    keys_before = db.scalar("SELECT count(*) FROM keystile.keys")
    response = client.import_keys(rows)
    assert response.imported == 1
    results = list(response.results)
    assert [r.index for r in results] == list(range(len(rows)))
    assert results[0].id and not results[0].error
    assert results[1].error.startswith("invalid") and list(results[1].fields) == ["owner_id"]
    assert list(results[2].fields) == ["secret_hash"]
    assert results[3].error == "duplicate secret_hash (as row 0)"
    assert results[4].error == "duplicate secret_hash (already stored)"
    assert list(results[5].fields) == ["create_time"]
    assert list(results[6].fields) == ["revoke_reason"]
    assert all(not r.id for r in results[1:])
    assert db.scalar("SELECT count(*) FROM keystile.keys") == keys_before + 1
    key = client.get_key(results[0].id)
    assert (key.owner_id, key.secret_hint, key.prefix, key.created_by) == (owner, good[:8], "old", "import")
    events = list(client.iter_audit_events(key_id=key.id))
    assert [e.action for e in events] == ["key.import"]


def test_a_base64_hash_and_history_come_in_as_given(client: keystile.Client, owner: str) -> None:
    secret = "old_" + os.urandom(16).hex()
    row = keys_pb2.ImportedKey(
        secret_hash=base64.urlsafe_b64encode(keystile.hash_key(secret)).decode().rstrip("="),
        owner_id=owner,
        name="with history",
        create_time=timestamp_pb2.Timestamp(seconds=1_600_000_000),
        revoke_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        revoke_reason="left the company",
        last_used_time=timestamp_pb2.Timestamp(seconds=1_650_000_000),
    )
    result = client.import_keys([row]).results[0]
    key = client.get_key(result.id)
    assert key.state == V.KEY_STATE_REVOKED and key.revoke_reason == "left the company"
    assert (key.create_time.seconds, key.revoke_time.seconds, key.last_used_time.seconds) == (
        1_600_000_000,
        1_700_000_000,
        1_650_000_000,
    )


@pytest.mark.parametrize("count", [0, 1001])
def test_a_batch_holds_1_to_1000_keys(client: keystile.Client, owner: str, db: Db, count: int) -> None:
    before = db.snapshot()
    rows = [_imported(owner, f"old_{i}") for i in range(count)]
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.import_keys(rows)
    assert "keys" in info.value.field_violations
    assert db.snapshot() == before


def test_imported_keys_verify_only_with_their_format_registered(
    client: keystile.Client, owner: str, start_server: Callable[..., RunningServer], database_url: str
) -> None:
    secret = "legacy_" + "a1" * 16
    client.import_keys([_imported(owner, secret)])
    assert client.verify_key(secret).result == V.VERIFY_RESULT_MALFORMED  # no format registered here
    server = start_server(
        server_settings(database_url, legacy_key_formats=parse_legacy_formats("legacy_=(?:[a-z][0-9]){16}"))
    )
    with server.client() as other:
        assert other.verify_key(secret).result == V.VERIFY_RESULT_VALID
        before = server.metrics().get("keystile_db_queries_total{op=find_by_hashes}", 0)
        for bogus in ("legacy_" + "a1" * 15, "legacy_" + "A1" * 16, "nope_" + "a1" * 16, "x" * 300):
            assert other.verify_key(bogus).result == V.VERIFY_RESULT_MALFORMED
        assert server.metrics().get("keystile_db_queries_total{op=find_by_hashes}", 0) == before
        unknown = "legacy_" + "b2" * 16
        assert other.verify_key(unknown).result == V.VERIFY_RESULT_NOT_FOUND


def test_legacy_format_settings_are_checked() -> None:
    formats = KeyFormats(parse_legacy_formats("wm_=[A-Za-z0-9]{32}  rdev_sk_=[0-9a-f]{48}"))
    assert formats.accepts("wm_" + "A" * 32) and formats.accepts("rdev_sk_" + "0" * 48)
    assert not formats.accepts("wm_" + "A" * 33) and not formats.accepts("xwm_" + "A" * 32)
    assert formats.accepts(keystile.generate_key("ks"))
    for bad in ("noequals", "=abc", "wm_=", "wm_=[unclosed", "bad prefix!=x", "p=" + "x" * 201):
        with pytest.raises(ValueError, match=r"PREFIX=REGEX|pattern|regular expression"):
            parse_legacy_formats(bad)


def test_create_with_a_caller_minted_hash(client: keystile.Client, owner: str, db: Db) -> None:
    secret = keystile.generate_key("ks")  # minted where the server never sees it
    parsed = keystile.parse_key(secret)
    assert parsed is not None
    created = client.create_key(
        owner, "browser", secret_hash=keystile.hash_key(secret), secret_hint=parsed.hint
    )
    assert created.secret == "" and created.key.secret_hint == parsed.hint
    assert client.verify_key(secret).result == V.VERIFY_RESULT_VALID
    before = db.snapshot()
    with pytest.raises(keystile.AlreadyExistsError) as taken:
        client.create_key(owner, "again", secret_hash=base64.b64encode(keystile.hash_key(secret)).decode())
    assert taken.value.reason == "SECRET_HASH_EXISTS"
    for fields, field in (
        ({"secret_hash": "abc"}, "secret_hash"),
        ({"secret_hint": "ks_abc"}, "secret_hint"),
        ({"secret_hash": os.urandom(32).hex(), "secret_hint": "x" * 65}, "secret_hint"),
    ):
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.create_key(owner, "bad", **fields)  # type: ignore[arg-type]
        assert field in info.value.field_violations
    assert db.snapshot() == before


def test_the_import_command_reads_csv_and_reports_every_row(
    server: RunningServer, owner: str, tmp_path: Path
) -> None:
    good = "old_" + os.urandom(16).hex()
    path = tmp_path / "keys.csv"
    path.write_text(
        "hash,user,name,scopes,active,created\n"
        f'{keystile.hash_key(good).hex()},{owner},ok,"jobs:read jobs:write",true,1700000000\n'
        f"{keystile.hash_key('old_2').hex()},{owner},bad time,,true,yesterday\n"
        f"zz,{owner},bad hash,,true,1700000000\n"
    )
    maps = ["--map", "secret_hash=hash", "--map", "owner_id=user", "--map", "disabled=active:not"]
    done = run_cli("import", "--target", server.address, str(path), *maps, "--map", "create_time=created:s")
    assert done.returncode == 1, done.stderr
    assert "row 2: invalid create_time" in done.stdout and "row 3: invalid secret_hash" in done.stdout
    assert "imported 1 of 3 keys; 0 already stored, 2 refused" in done.stdout
    with server.client() as client:
        verdict = client.verify_key(good, required_scopes=["jobs:write"])
        assert verdict.result == V.VERIFY_RESULT_MALFORMED  # the test server registers no legacy format
        [key] = [k for k in client.iter_keys(owner) if k.name == "ok"]
        assert list(key.scopes) == ["jobs:read", "jobs:write"] and key.create_time.seconds == 1_700_000_000
    again = run_cli("import", "--target", server.address, str(path), *maps, "--json")
    report = json.loads(again.stdout)
    # Without --map create_time, "created" is no field: row 2 imports now, row 1 is already stored.
    assert (report["imported"], report["already_stored"], report["refused"]) == (1, 1, 1)
