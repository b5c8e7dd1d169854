"""Owner policies: key quotas counted race-free, mandatory expiry, limits shared by an owner's keys."""

from __future__ import annotations

import concurrent.futures
import json
import time
from datetime import timedelta

import pytest
from fix_db import Db
from fix_server import RunningServer, run_cli

import keystile
from keystile.v1 import keys_pb2

R = keys_pb2


def test_set_get_delete(client: keystile.Client, owner: str) -> None:
    with pytest.raises(keystile.NotFoundError) as missing:
        client.get_owner_policy(owner)
    assert missing.value.reason == "POLICY_NOT_FOUND"
    stored = client.set_owner_policy(
        keystile.owner_policy(
            owner, max_active_keys=5, max_key_lifetime=3600, limits=[keystile.rate_limit("shared", 100, 60)]
        )
    )
    assert stored.max_active_keys == 5 and stored.max_key_lifetime.seconds == 3600
    assert [(x.name, x.limit) for x in stored.limits] == [("shared", 100)]
    assert stored.HasField("update_time")
    assert client.get_owner_policy(owner) == stored
    client.delete_owner_policy(owner)
    client.delete_owner_policy(owner)  # idempotent
    with pytest.raises(keystile.NotFoundError):
        client.get_owner_policy(owner)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (keystile.owner_policy("bad owner!"), "policy.owner_id"),
        (keystile.owner_policy("ok", max_key_lifetime=-1), "policy.max_key_lifetime"),
        # Found by the fuzzer: under a millisecond was stored as 0, which the table refuses (INTERNAL).
        (
            keystile.owner_policy("ok", max_key_lifetime=timedelta(microseconds=500)),
            "policy.max_key_lifetime",
        ),
        (keystile.owner_policy("ok", limits=[keystile.rate_limit("w", 0, 1)]), "policy.limits[0].limit"),
    ],
)
def test_bad_policies_change_nothing(
    client: keystile.Client, db: Db, policy: keys_pb2.OwnerPolicy, field: str
) -> None:
    before = db.snapshot()
    with pytest.raises(keystile.InvalidArgumentError) as err:
        client.set_owner_policy(policy)
    assert field in err.value.field_violations
    assert db.snapshot() == before


def test_key_quota_holds_under_20_concurrent_creates(server: RunningServer, owner: str) -> None:
    with server.client() as admin:
        admin.set_owner_policy(keystile.owner_policy(owner, max_active_keys=5))

    def create(i: int) -> str:
        with server.client() as c:
            try:
                c.create_key(owner, f"k{i}")
                return "created"
            except keystile.KeystileError as exc:
                return f"{exc.code.name}:{exc.reason}"

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(create, range(20)))
    assert outcomes.count("created") == 5
    assert outcomes.count("RESOURCE_EXHAUSTED:KEY_LIMIT_REACHED") == 15
    with server.client() as admin:
        keys = list(admin.iter_keys(owner))
        assert len(keys) == 5
        admin.revoke_key(keys[0].id)  # a revoked key no longer counts
        admin.create_key(owner, "replacement")
        with pytest.raises(keystile.KeystileError) as full:
            admin.create_key(owner, "one too many")
        assert full.value.reason == "KEY_LIMIT_REACHED"


def test_mandatory_expiry(client: keystile.Client, owner: str) -> None:
    client.set_owner_policy(keystile.owner_policy(owner, max_key_lifetime=timedelta(days=30)))
    with pytest.raises(keystile.InvalidArgumentError) as never:
        client.create_key(owner, "forever")
    assert "expire_time" in never.value.field_violations
    with pytest.raises(keystile.InvalidArgumentError) as too_long:
        client.create_key(owner, "long", ttl=timedelta(days=31))
    assert "ttl" in too_long.value.field_violations
    assert client.create_key(owner, "ok", ttl=timedelta(days=29)).key.HasField("expire_time")
    assert len(list(client.iter_keys(owner))) == 1


def test_shared_limits_bind_all_of_an_owners_keys(client: keystile.Client, owner: str) -> None:
    client.set_owner_policy(keystile.owner_policy(owner, limits=[keystile.rate_limit("tenant", 10, 60)]))
    first, second = (client.create_key(owner, name).secret for name in ("a", "b"))
    results = [client.verify_key(secret).result for _ in range(8) for secret in (first, second)]
    assert results.count(R.VERIFY_RESULT_VALID) == 10
    refused = client.verify_key(first)
    assert refused.result == R.VERIFY_RESULT_RATE_LIMITED
    assert refused.limit.name == "tenant" and refused.limit.owner


def test_a_limit_change_takes_effect_at_once(client: keystile.Client, owner: str) -> None:
    client.set_owner_policy(keystile.owner_policy(owner, limits=[keystile.rate_limit("tenant", 100, 60)]))
    secret = client.create_key(owner, "a").secret
    assert [client.verify_key(secret).result for _ in range(10)] == [R.VERIFY_RESULT_VALID] * 10
    client.set_owner_policy(keystile.owner_policy(owner, limits=[keystile.rate_limit("tenant", 12, 60)]))
    time.sleep(0.2)  # the policy's key events reach this process
    later = [client.verify_key(secret).result for _ in range(20)]
    # At most what the lowered limit leaves beside the units already granted (10 spent, some leased).
    assert later.count(R.VERIFY_RESULT_VALID) <= 2
    assert later[-1] == R.VERIFY_RESULT_RATE_LIMITED
    client.delete_owner_policy(owner)
    time.sleep(0.2)
    assert client.verify_key(secret).result == R.VERIFY_RESULT_VALID


def test_the_cli_sets_limits_policies_and_credits(server: RunningServer, owner: str) -> None:
    target = ("--target", server.address)
    created = run_cli(
        "keys", "create", *target, "--owner", owner, "--name", "cli", "--limit", "second=10/1s",
        "--limit", "day=10000/1d+500", "--credits", "5", "--refill", "monthly", "--refill-amount", "100",
        "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    assert [(x["name"], x["limit"]) for x in key["limits"]] == [("second", "10"), ("day", "10000")]
    assert key["limits"][1]["burst"] == "500" and key["credits"]["refill"] == "CREDIT_REFILL_MONTHLY"
    shown = run_cli("keys", "get", *target, key["id"])
    assert "second=10/1s day=10000/86400s+500" in shown.stdout
    assert "refilled monthly to 100" in shown.stdout
    assert run_cli("credits", "get", *target, key["id"]).stdout.split()[:2] == ["remaining", "5"]
    assert "remaining  12" in run_cli("credits", "set", *target, key["id"], "12").stdout
    assert "remaining  15" in run_cli("credits", "add", *target, key["id"], "3").stdout

    policy = run_cli(
        "policy", "set", *target, "--owner", owner, "--max-active-keys", "3", "--max-key-lifetime", "90d",
        "--limit", "tenant=100/1m",
    )  # fmt: skip
    assert policy.returncode == 0, policy.stderr
    assert "max active keys   3" in policy.stdout and "tenant=100/60s" in policy.stdout
    assert "90 days" in run_cli("policy", "get", *target, "--owner", owner).stdout
    assert run_cli("policy", "delete", *target, "--owner", owner).returncode == 0
    missing = run_cli("policy", "get", *target, "--owner", owner)
    assert missing.returncode == 1 and "POLICY_NOT_FOUND" in missing.stderr
    bad = run_cli("keys", "create", *target, "--owner", owner, "--name", "x", "--limit", "nonsense")
    assert bad.returncode == 2 and "NAME=COUNT/WINDOW" in bad.stderr
