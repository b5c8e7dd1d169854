"""The key lifecycle: UpdateKey, disable and enable, RollKey, cascading RevokeKey, DeleteKey,
retention, the audit trail and the admin views, against a real server and PostgreSQL.

The role matrix for these RPCs is in test_auth.py; propagation across worker processes and a
caching client is in test_workers.py.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fix_db import Db
from fix_server import RunningServer, server_settings

import keystile
from keystile.v1 import keys_pb2


def _verify(client: keystile.Client, secret: str, **kw: Any) -> int:
    return client.verify_key(secret, **kw).result


def _events(client: keystile.Client, key_id: str) -> list[keys_pb2.AuditEvent]:
    return list(client.iter_audit_events(key_id=key_id))


# -- UpdateKey ------------------------------------------------------------------------------


def test_update_changes_only_the_masked_fields_and_records_what_changed(
    client: keystile.Client, owner: str
) -> None:
    made = client.create_key(owner, "svc", scopes=["jobs:read"], metadata={"team": "a"})
    expiry = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    updated = client.update_key(
        made.key.id,
        name="svc renamed",
        scopes=["jobs:read", "jobs:write"],
        resources=["project-42"],
        metadata={"team": "b"},
        expire_time=expiry,
        limits=[keystile.rate_limit("burst", 10, timedelta(seconds=1))],
    )
    assert updated.name == "svc renamed"
    assert list(updated.scopes) == ["jobs:read", "jobs:write"] and list(updated.resources) == ["project-42"]
    assert updated.metadata["team"] == "b" and updated.expire_time.ToDatetime(tzinfo=UTC) == expiry
    assert [limit.name for limit in updated.limits] == ["burst"]
    assert client.get_key(made.key.id) == updated
    assert _verify(client, made.secret, required_scopes=["jobs:write"]) == keys_pb2.VERIFY_RESULT_VALID
    untouched = client.update_key(made.key.id, name="again")  # the rest stays as it was
    assert list(untouched.scopes) == ["jobs:read", "jobs:write"] and untouched.metadata["team"] == "b"
    event = _events(client, made.key.id)[1]  # newest first: the second is the big update
    assert event.action == "key.update" and event.owner_id == owner
    changed = {c.field: c for c in event.changes}
    assert set(changed) == {"name", "scopes", "resources", "metadata", "expire_time", "limits"}
    assert changed["name"].old_value.string_value == "svc"
    assert changed["name"].new_value.string_value == "svc renamed"
    assert [v.string_value for v in changed["scopes"].new_value.list_value.values] == [
        "jobs:read",
        "jobs:write",
    ]


def test_clearing_the_expiry_and_the_limits(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc", ttl=timedelta(days=1), rate_limit_per_minute=5)
    updated = client.update_key(made.key.id, expire_time=None, limits=[])
    assert not updated.HasField("expire_time") and not updated.limits and updated.rate_limit_per_minute == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (keys_pb2.UpdateKeyRequest(), "update_mask"),
        (keys_pb2.UpdateKeyRequest(update_mask={"paths": ["secret_hint"]}), "update_mask"),
        (keys_pb2.UpdateKeyRequest(update_mask={"paths": ["owner_id"]}), "update_mask"),
        (keys_pb2.UpdateKeyRequest(update_mask={"paths": ["name", "name"]}), "update_mask"),
        (keys_pb2.UpdateKeyRequest(update_mask={"paths": ["name"]}), "key.name"),
        (
            keys_pb2.UpdateKeyRequest(key={"scopes": ["Bad Scope"]}, update_mask={"paths": ["scopes"]}),
            "key.scopes[0]",
        ),
        (
            keys_pb2.UpdateKeyRequest(
                key={"expire_time": {"seconds": 1}}, update_mask={"paths": ["expire_time"]}
            ),
            "key.expire_time",
        ),
        (
            keys_pb2.UpdateKeyRequest(
                key={"limits": [{"name": "x", "limit": 0, "window": {"seconds": 1}}]},
                update_mask={"paths": ["limits"]},
            ),
            "key.limits[0].limit",
        ),
    ],
)
def test_bad_updates_are_invalid_argument_and_change_nothing(
    server: RunningServer, client: keystile.Client, owner: str, db: Db, request_: Any, field: str
) -> None:
    made = client.create_key(owner, "svc")
    request_.key.id = made.key.id
    before = db.snapshot()
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client._call(client._stub.UpdateKey, request_, None)
    assert field in info.value.field_violations, info.value.field_violations
    assert db.snapshot() == before


def test_a_tenant_cannot_give_a_key_more_than_its_own(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    writer = client.create_key(owner, "writer", scopes=["keys:write", "jobs:read"], ttl=timedelta(days=1))
    target = client.create_key(owner, "svc", scopes=["jobs:read"], ttl=timedelta(hours=1))
    with server.client(api_key=writer.secret) as tenant:
        for fields, field in (
            ({"scopes": ["jobs:write"]}, "scopes[0]"),
            ({"expire_time": None}, "key.expire_time"),
            ({"expire_time": datetime.now(UTC) + timedelta(days=30)}, "key.expire_time"),
        ):
            with pytest.raises(keystile.PermissionDeniedError) as info:
                tenant.update_key(target.key.id, **fields)
            assert info.value.reason == "ESCALATION" and field in info.value.field_violations
        assert list(tenant.update_key(target.key.id, scopes=[]).scopes) == []  # narrowing is fine


def test_revoked_and_expired_keys_cannot_change(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc")
    client.revoke_key(made.key.id)
    for fields in ({"name": "x"}, {"disabled": False}, {"expire_time": None}):
        with pytest.raises(keystile.FailedPreconditionError) as info:
            client.update_key(made.key.id, **fields)
        assert info.value.reason == "KEY_NOT_ACTIVE"
    with pytest.raises(keystile.NotFoundError):
        client.update_key("00000000-0000-0000-0000-000000000000", name="x")


def test_an_update_is_held_to_the_owner_policy_lifetime(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc", ttl=timedelta(hours=1))
    client.set_owner_policy(keystile.owner_policy(owner, max_key_lifetime=timedelta(days=1)))
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.update_key(made.key.id, expire_time=None)
    assert "key.expire_time" in info.value.field_violations
    client.update_key(made.key.id, expire_time=datetime.now(UTC) + timedelta(hours=20))


# -- disable / enable -------------------------------------------------------------------------


def test_disable_refuses_at_once_and_enable_restores(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc")
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID  # now cached
    off = client.update_key(made.key.id, disabled=True)
    assert off.disabled and off.state == keys_pb2.KEY_STATE_DISABLED
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_DISABLED
    assert [k.id for k in client.list_keys(owner).keys] == [made.key.id]  # still listed as live
    on = client.update_key(made.key.id, disabled=False)
    assert not on.disabled and on.state == keys_pb2.KEY_STATE_ACTIVE
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID
    assert [e.action for e in _events(client, made.key.id)] == ["key.enable", "key.disable", "key.create"]


def test_a_disabled_key_cannot_call_keystile(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    caller = client.create_key(owner, "ops", scopes=["keys:read"])
    client.update_key(caller.key.id, disabled=True)
    with (
        server.client(api_key=caller.secret) as disabled,
        pytest.raises(keystile.UnauthenticatedError) as info,
    ):
        disabled.list_keys(owner)
    assert info.value.reason == "CREDENTIALS_DISABLED"


def test_revocation_wins_over_disabling(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc")
    client.update_key(made.key.id, disabled=True)
    revoked = client.revoke_key(made.key.id)
    assert revoked.state == keys_pb2.KEY_STATE_REVOKED
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_REVOKED


# -- RollKey ---------------------------------------------------------------------------------


def test_roll_mints_the_same_grant_and_links_both_keys(client: keystile.Client, owner: str) -> None:
    made = client.create_key(
        owner, "svc", scopes=["jobs:read"], resources=["p-1"], metadata={"a": 1}, ttl=timedelta(days=2)
    )
    rolled = client.roll_key(made.key.id, grace_period=timedelta(hours=1))
    new, old = rolled.key, rolled.replaced
    assert new.id != made.key.id and rolled.secret != made.secret
    assert (new.owner_id, new.name, list(new.scopes), list(new.resources)) == (
        owner,
        "svc",
        ["jobs:read"],
        ["p-1"],
    )
    assert new.expire_time == made.key.expire_time and new.metadata == made.key.metadata
    assert new.replaces == made.key.id and old.replaced_by == new.id
    assert client.get_key(made.key.id).replaced_by == new.id
    assert old.expire_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC) + timedelta(hours=1, seconds=5)
    assert _verify(client, rolled.secret, required_scopes=["jobs:read"]) == keys_pb2.VERIFY_RESULT_VALID
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID  # within its grace period
    actions = [e.action for e in client.iter_audit_events(owner_id=owner)]
    assert actions[:2] == ["key.create", "key.roll"] or actions[:2] == ["key.roll", "key.create"]


def test_the_old_secret_stops_exactly_at_the_end_of_its_grace_period(
    client: keystile.Client, owner: str
) -> None:
    made = client.create_key(owner, "svc")
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID  # cached before the roll
    rolled = client.roll_key(made.key.id, grace_period=1.5)
    end = rolled.replaced.expire_time.ToDatetime(tzinfo=UTC)
    while datetime.now(UTC) < end - timedelta(milliseconds=200):
        assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID
        time.sleep(0.05)
    while datetime.now(UTC) < end:
        time.sleep(0.01)
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_EXPIRED
    assert _verify(client, rolled.secret) == keys_pb2.VERIFY_RESULT_VALID


def test_without_a_grace_period_the_old_secret_stops_at_once(client: keystile.Client, owner: str) -> None:
    made = client.create_key(owner, "svc")
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_VALID
    rolled = client.roll_key(made.key.id)
    assert rolled.replaced.state == keys_pb2.KEY_STATE_EXPIRED
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_EXPIRED


def test_roll_refusals(client: keystile.Client, owner: str, db: Db) -> None:
    made = client.create_key(owner, "svc")
    client.roll_key(made.key.id, grace_period=60)
    before = db.snapshot()
    with pytest.raises(keystile.FailedPreconditionError) as info:
        client.roll_key(made.key.id, grace_period=60)
    assert info.value.reason == "KEY_ALREADY_ROLLED"
    dead = client.create_key(owner, "dead")
    client.revoke_key(dead.key.id)
    before = db.snapshot()
    with pytest.raises(keystile.FailedPreconditionError) as info:
        client.roll_key(dead.key.id)
    assert info.value.reason == "KEY_NOT_ACTIVE"
    for grace in (-1, 31 * 86400):
        with pytest.raises(keystile.InvalidArgumentError) as bad:
            client.roll_key(dead.key.id, grace_period=timedelta(seconds=grace))
        assert "grace_period" in bad.value.field_violations
    assert db.snapshot() == before


def test_a_rolled_grant_shares_its_limit_and_credits(client: keystile.Client, owner: str) -> None:
    made = client.create_key(
        owner, "svc", limits=[keystile.rate_limit("m", 4, timedelta(minutes=1))], credits=100
    )
    rolled = client.roll_key(made.key.id, grace_period=60)
    results = [_verify(client, secret) for secret in (made.secret, rolled.secret) * 3]
    assert results.count(keys_pb2.VERIFY_RESULT_VALID) == 4, results  # one limit for both secrets
    assert client.get_credits(rolled.key.id).remaining == client.get_credits(made.key.id).remaining == 96


# -- cascade, created_by, admin views ---------------------------------------------------------


def test_cascade_revokes_three_generations_in_one_transaction(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    a = client.create_key(owner, "a", scopes=["keys:write"])
    with server.client(api_key=a.secret) as as_a:
        b = as_a.create_key(owner, "b", scopes=["keys:write"])
        b_sibling = as_a.create_key(owner, "b2")
    with server.client(api_key=b.secret) as as_b:
        c = as_b.create_key(owner, "c", scopes=["keys:write"])
    with server.client(api_key=c.secret) as as_c:
        d = as_c.create_key(owner, "d")
    bystander = client.create_key(owner, "bystander")
    assert [k.id for k in client.list_keys(owner, created_by=a.key.id).keys] == [b_sibling.key.id, b.key.id]
    assert [k.id for k in client.list_keys(owner, created_by=b.key.id).keys] == [c.key.id]
    plain = client.revoke_key(b_sibling.key.id)  # no cascade: nothing else
    assert plain.state == keys_pb2.KEY_STATE_REVOKED
    response = client.revoke_keys(a.key.id, reason="leaked")
    assert sorted(response.cascaded_ids) == sorted([b.key.id, c.key.id, d.key.id])  # b2 was already revoked
    for made in (a, b, c, d):
        assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_REVOKED
    assert client.get_key(c.key.id).revoke_reason == f"cascade from {a.key.id}"
    assert _verify(client, bystander.secret) == keys_pb2.VERIFY_RESULT_VALID
    revocations = [e for e in client.iter_audit_events(owner_id=owner) if e.action == "key.revoke"]
    assert {e.key_id for e in revocations} == {a.key.id, b.key.id, c.key.id, d.key.id, b_sibling.key.id}


def test_admins_list_across_owners_and_find_a_key_by_its_hint(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    first = client.create_key(owner, "one")
    second = client.create_key(owner + "-b", "two")
    everyone = {k.id for k in client.iter_keys("")}
    assert {first.key.id, second.key.id} <= everyone
    found = client.list_keys("", secret_hint=second.key.secret_hint)
    assert [k.id for k in found.keys] == [second.key.id]
    assert client.list_keys(owner, secret_hint=second.key.secret_hint).keys == []
    reader = client.create_key(owner, "reader", scopes=["keys:read"])
    with server.client(api_key=reader.secret) as tenant:
        with pytest.raises(keystile.InvalidArgumentError) as info:
            tenant.list_keys("")
        assert "owner_id" in info.value.field_violations
        assert [k.id for k in tenant.list_keys(owner, secret_hint=first.key.secret_hint).keys] == [
            first.key.id
        ]
    with pytest.raises(keystile.InvalidArgumentError):
        client.list_keys("", secret_hint="x" * 65)


def test_who_acted_filters_take_ids_and_names_and_refuse_what_cannot_be_stored(
    client: keystile.Client, owner: str
) -> None:
    """``created_by`` and ``actor_key_id``: an id in any spelling, a recorded name, or nothing found.

    The fuzzer sent a NUL in ``created_by``: it reached PostgreSQL, which refused it, and the
    caller got INTERNAL. Text that no key could have acted under is now a bad request.
    """
    parent = client.create_key(owner, "parent", scopes=["keys:write"])
    digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    imported = client.import_keys([keys_pb2.ImportedKey(owner_id=owner, name="old", secret_hash=digest)])
    imported_id = imported.results[0].id
    assert imported_id, imported
    upper = parent.key.id.upper()
    assert [e.key_id for e in client.iter_audit_events(actor_key_id=upper)] == []  # it created nothing
    assert client.list_keys(owner, created_by=upper).keys == []
    assert [k.id for k in client.list_keys(owner, created_by="import").keys] == [imported_id]
    assert client.list_keys(owner, created_by="nobody in particular").keys == []
    for bad in ("a\x00b", "line\nbreak", "x" * 200):
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.list_keys(owner, created_by=bad)
        assert "created_by" in info.value.field_violations
        with pytest.raises(keystile.InvalidArgumentError) as info:
            client.list_audit_events(actor_key_id=bad)
        assert "actor_key_id" in info.value.field_violations


def test_listing_pages_are_bound_to_their_filters(client: keystile.Client, owner: str) -> None:
    parent = client.create_key(owner, "parent", scopes=["keys:write"])
    for i in range(3):
        client.create_key(owner, f"k{i}")
    page = client.list_keys(owner, page_size=2)
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.list_keys(owner, page_size=2, page_token=page.next_page_token, created_by=parent.key.id)
    assert "page_token" in info.value.field_violations


# -- DeleteKey and retention --------------------------------------------------------------------


def test_delete_removes_a_dead_key_and_keeps_its_audit_trail(
    client: keystile.Client, owner: str, db: Db
) -> None:
    made = client.create_key(owner, "svc", credits=5)
    before = db.snapshot()
    with pytest.raises(keystile.FailedPreconditionError) as info:
        client.delete_key(made.key.id)
    assert info.value.reason == "KEY_STILL_ACTIVE"
    for bad in ("", "x" * 300):
        with pytest.raises(keystile.InvalidArgumentError):
            client.delete_key(bad)
    assert db.snapshot() == before
    client.revoke_key(made.key.id)
    client.delete_key(made.key.id)
    with pytest.raises(keystile.NotFoundError):
        client.get_key(made.key.id)
    with pytest.raises(keystile.NotFoundError):
        client.delete_key(made.key.id)
    assert _verify(client, made.secret) == keys_pb2.VERIFY_RESULT_NOT_FOUND
    assert [e.action for e in _events(client, made.key.id)] == ["key.delete", "key.revoke", "key.create"]
    assert db.scalar("SELECT count(*) FROM keystile.key_credits WHERE key_id = %s", (made.key.id,)) == 0


def test_retention_purges_dead_keys_and_old_events(
    start_server: Callable[..., RunningServer], database_url: str, db: Db, owner: str
) -> None:
    first = start_server(server_settings(database_url))
    with first.client() as admin:
        old = admin.create_key(owner, "old")
        recent = admin.create_key(owner, "recent")
        live = admin.create_key(owner, "live")
        for made in (old, recent):
            admin.revoke_key(made.key.id)
    db.execute(
        "UPDATE keystile.keys SET revoke_time = now() - interval '10 days' WHERE id = %s", (old.key.id,)
    )
    db.execute(
        "INSERT INTO keystile.audit_events (event_time, action, actor, owner_id) "
        "VALUES (now() - interval '100 days', 'key.create', 'test', %s)",
        (owner,),
    )
    first.stop()
    server = start_server(server_settings(database_url, key_retention_days=7, audit_retention_days=90))
    with server.client() as admin:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            remaining = {k.id for k in admin.iter_keys(owner, include_inactive=True)}
            if old.key.id not in remaining:
                break
            time.sleep(0.1)
        assert remaining == {recent.key.id, live.key.id}
        last = _events(admin, old.key.id)[0]
        assert (last.action, last.actor_key_id) == ("key.delete", "retention")
    assert (
        db.scalar("SELECT count(*) FROM keystile.audit_events WHERE event_time < now() - interval '90 days'")
        == 0
    )


# -- the audit trail -------------------------------------------------------------------------------


def test_audit_events_name_the_actor_and_never_a_secret_or_hash(
    server: RunningServer, client: keystile.Client, owner: str, db: Db
) -> None:
    writer = client.create_key(owner, "writer", scopes=["keys:write"])
    with server.client(api_key=writer.secret) as tenant:
        made = tenant.create_key(owner, "svc")
        rolled = tenant.roll_key(made.key.id, grace_period=10)
        tenant.update_key(rolled.key.id, name="svc2")
    client.set_owner_policy(keystile.owner_policy(owner, max_active_keys=50))
    events = list(client.iter_audit_events(owner_id=owner))
    assert {e.actor_key_id for e in events if e.key_id in (made.key.id, rolled.key.id)} == {writer.key.id}
    assert "policy.set" in [e.action for e in events]
    text = json.dumps([row[0] for row in db.query("SELECT changes FROM keystile.audit_events")])
    for secret in (writer.secret, made.secret, rolled.secret):
        assert secret not in text
        assert keystile.hash_key(secret).hex() not in text
    assert "secret_hash" not in text


def test_audit_filters_paging_and_tenancy(server: RunningServer, client: keystile.Client, owner: str) -> None:
    made = [client.create_key(owner, f"k{i}") for i in range(5)]
    other = client.create_key(owner + "-x", "elsewhere")
    middle = datetime.now(UTC)
    time.sleep(0.01)
    client.update_key(made[0].key.id, name="late")
    assert [e.key_id for e in client.list_audit_events(owner_id=owner, start_time=middle).events] == [
        made[0].key.id
    ]
    assert len(list(client.iter_audit_events(owner_id=owner, end_time=middle))) == 5
    pages, token = [], ""
    while True:
        page = client.list_audit_events(owner_id=owner, page_size=2, page_token=token)
        pages.append([e.id for e in page.events])
        token = page.next_page_token
        if not token:
            break
    ids = [i for p in pages for i in p]
    assert len(ids) == 6 and ids == sorted(ids, reverse=True) and max(len(p) for p in pages) == 2
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.list_audit_events(
            owner_id=owner + "-x",
            page_token=client.list_audit_events(owner_id=owner, page_size=1).next_page_token,
        )
    assert "page_token" in info.value.field_violations
    reader = client.create_key(owner, "reader", scopes=["keys:read"])
    with server.client(api_key=reader.secret) as tenant:
        mine = {e.key_id for e in tenant.iter_audit_events()}  # no owner: its own
        assert {m.key.id for m in made} <= mine and other.key.id not in mine
        with pytest.raises(keystile.PermissionDeniedError):
            tenant.list_audit_events(owner_id=owner + "-x")
        assert tenant.list_audit_events(key_id=other.key.id).events == []
    with pytest.raises(keystile.InvalidArgumentError) as info:
        client.list_audit_events(start_time=middle, end_time=middle - timedelta(seconds=1))
    assert "end_time" in info.value.field_violations


def test_audit_events_cannot_be_rewritten(db: Db, client: keystile.Client, owner: str) -> None:
    client.create_key(owner, "svc")
    with pytest.raises(Exception, match="append-only"):
        db.execute("UPDATE keystile.audit_events SET actor = 'someone' WHERE owner_id = %s", (owner,))
