"""Rate limits and credits on one server: VALID until a limit is spent, then a refusal with its status."""

from __future__ import annotations

import asyncio
import time

import pytest
from fix_db import Db
from fix_server import AioLoop, RunningServer

import keystile
from keystile.v1 import keys_pb2

R = keys_pb2


def _results(client: keystile.Client, secret: str, n: int, **kw: object) -> list[int]:
    return [client.verify_key(secret, **kw).result for _ in range(n)]  # type: ignore[arg-type]


def test_limit_admits_exactly_its_count_then_refuses(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("burst", 10, 30)])
    results = _results(client, created.secret, 25)
    assert results.count(R.VERIFY_RESULT_VALID) == 10
    assert results[:10] == [R.VERIFY_RESULT_VALID] * 10
    refused = client.verify_key(created.secret)
    assert refused.result == R.VERIFY_RESULT_RATE_LIMITED
    assert refused.key.id == created.key.id
    assert refused.limit.name == "burst" and refused.limit.limit == 10 and refused.limit.remaining == 0
    # Units come back a window after the lease that held them ends (a lease lasts W/20), in whole seconds.
    assert 0 < refused.limit.reset.ToTimedelta().total_seconds() <= 30 * 1.05 + 1
    assert refused.limit.window.ToTimedelta().total_seconds() == 30


def test_rate_limit_per_minute_is_enforced(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", rate_limit_per_minute=1)
    assert [limit.name for limit in created.key.limits] == ["per_minute"]
    assert _results(client, created.secret, 200).count(R.VERIFY_RESULT_VALID) == 1


def test_valid_answers_carry_the_closest_limit(client: keystile.Client, owner: str) -> None:
    created = client.create_key(
        owner,
        "svc",
        limits=[keystile.rate_limit("second", 100, 1), keystile.rate_limit("day", 5, 86400)],
    )
    first = client.verify_key(created.secret)
    assert first.result == R.VERIFY_RESULT_VALID
    assert first.limit.name == "day" and first.limit.limit == 5 and first.limit.remaining <= 4


def test_cost_spends_several_units(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 10, 60)])
    assert client.verify_key(created.secret, cost=6).result == R.VERIFY_RESULT_VALID
    assert client.verify_key(created.secret, cost=6).result == R.VERIFY_RESULT_RATE_LIMITED
    assert client.verify_key(created.secret, cost=4).result == R.VERIFY_RESULT_VALID


def test_other_checks_come_first(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", scopes=["a:read"], limits=[keystile.rate_limit("w", 1, 60)])
    assert client.verify_key(created.secret).result == R.VERIFY_RESULT_VALID
    assert client.verify_key(created.secret).result == R.VERIFY_RESULT_RATE_LIMITED
    assert client.verify_key(created.secret, required_scopes=["b:write"]).result == (
        R.VERIFY_RESULT_INSUFFICIENT_SCOPE
    )
    client.revoke_key(created.key.id)
    assert client.verify_key(created.secret).result == R.VERIFY_RESULT_REVOKED


def test_window_slides(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 3, 1)])
    assert _results(client, created.secret, 6).count(R.VERIFY_RESULT_VALID) == 3
    time.sleep(1.1)
    assert _results(client, created.secret, 6).count(R.VERIFY_RESULT_VALID) == 3


def test_burst_adds_to_the_limit(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 3, 60, burst=2)])
    assert _results(client, created.secret, 10).count(R.VERIFY_RESULT_VALID) == 5


def test_credits_run_out(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", credits=5)
    assert created.key.credits.refill == R.CREDIT_REFILL_UNSPECIFIED
    results = _results(client, created.secret, 8)
    assert results.count(R.VERIFY_RESULT_VALID) == 5
    exhausted = client.verify_key(created.secret)
    assert exhausted.result == R.VERIFY_RESULT_USAGE_EXCEEDED
    assert exhausted.limit.name == "credits" and exhausted.limit.remaining == 0
    assert client.get_credits(created.key.id).remaining == 0


def test_admin_adds_and_sets_credits(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", credits=1)
    assert client.verify_key(created.secret).result == R.VERIFY_RESULT_VALID
    assert client.verify_key(created.secret).result == R.VERIFY_RESULT_USAGE_EXCEEDED
    assert client.update_credits(created.key.id, add=3).remaining == 3
    # The change is a key event: the refusal this process remembered is dropped at once.
    deadline = time.monotonic() + 5
    while client.verify_key(created.secret).result != R.VERIFY_RESULT_VALID:
        assert time.monotonic() < deadline
    assert client.update_credits(created.key.id, set_to=0).remaining == 0


def test_credits_with_monthly_refill(client: keystile.Client, owner: str) -> None:
    created = client.create_key(owner, "svc", credits=keystile.credits(2, refill="monthly", refill_amount=50))
    assert created.key.credits.refill == R.CREDIT_REFILL_MONTHLY
    assert created.key.credits.refill_amount == 50
    assert _results(client, created.secret, 3).count(R.VERIFY_RESULT_VALID) == 2
    refused = client.verify_key(created.secret)
    assert refused.result == R.VERIFY_RESULT_USAGE_EXCEEDED
    assert 0 < refused.limit.reset.ToTimedelta().total_seconds() <= 31 * 86400


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ([keystile.rate_limit("Bad Name", 1, 1)], "limits[0].name"),
        ([keystile.rate_limit("w", 0, 1)], "limits[0].limit"),
        ([keystile.rate_limit("w", 1, 0.5)], "limits[0].window"),
        ([keystile.rate_limit("w", 1, 86401)], "limits[0].window"),
        ([keystile.rate_limit("w", 1, 1.0005)], "limits[0].window"),
        ([keystile.rate_limit("w", 1, 1), keystile.rate_limit("w", 2, 2)], "limits[1].name"),
        ([keystile.rate_limit("credits", 1, 1)], "limits[0].name"),
        ([keystile.rate_limit(f"l{i}", 1, 1) for i in range(9)], "limits"),
    ],
)
def test_bad_limits_are_refused(
    client: keystile.Client, owner: str, limits: list[keys_pb2.RateLimit], field: str
) -> None:
    with pytest.raises(keystile.InvalidArgumentError) as err:
        client.create_key(owner, "svc", limits=limits)
    assert field in err.value.field_violations
    assert not list(client.iter_keys(owner))


def test_bad_costs_are_refused(client: keystile.Client, owner: str) -> None:
    secret = client.create_key(owner, "svc", credits=10).secret
    with pytest.raises(keystile.InvalidArgumentError):
        client.verify_key(secret, cost=1001)
    assert client.get_credits(client.verify_key(secret).key.id).remaining <= 9


def test_a_limited_key_cannot_mint_a_less_limited_one(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    writer = client.create_key(owner, "writer", scopes=["keys:write"], rate_limit_per_minute=10)
    with keystile.Client(server.address, api_key=writer.secret) as limited:
        for options in ({}, {"rate_limit_per_minute": 11}, {"limits": [keystile.rate_limit("w", 10, 30)]}):
            with pytest.raises(keystile.PermissionDeniedError) as denied:
                limited.create_key(owner, "child", **options)  # type: ignore[arg-type]
            assert denied.value.reason == "ESCALATION" and "limits" in denied.value.field_violations
        # As strict or stricter passes: the same, or fewer over a longer window.
        limited.create_key(owner, "same", rate_limit_per_minute=10)
        limited.create_key(owner, "stricter", limits=[keystile.rate_limit("hour", 5, 3600)])


def test_a_key_with_credits_cannot_mint_one_without(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    writer = client.create_key(owner, "writer", scopes=["keys:write"], credits=100)
    with keystile.Client(server.address, api_key=writer.secret) as metered:
        with pytest.raises(keystile.PermissionDeniedError) as denied:
            metered.create_key(owner, "free")
        assert "credits" in denied.value.field_violations
        with pytest.raises(keystile.PermissionDeniedError):
            metered.create_key(
                owner, "refilling", credits=keystile.credits(5, refill="daily", refill_amount=5)
            )
        metered.create_key(owner, "metered", credits=50)


def test_revocation_ends_leased_units_at_once(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 1000, 60)])
    with server.client(cache=True) as caching:
        deadline = time.monotonic() + 5
        while not caching.cache_stats().live:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(50):  # both this client and the server now hold leased units
            assert caching.verify_key(created.secret).result == R.VERIFY_RESULT_VALID
            assert client.verify_key(created.secret).result == R.VERIFY_RESULT_VALID
        client.revoke_key(created.key.id)
        assert client.verify_key(created.secret).result == R.VERIFY_RESULT_REVOKED
        deadline = time.monotonic() + 2
        while caching.verify_key(created.secret).result != R.VERIFY_RESULT_REVOKED:
            assert time.monotonic() < deadline


def test_caching_client_spends_leases_from_memory(
    server: RunningServer, client: keystile.Client, owner: str
) -> None:
    created = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 500, 60)])
    with server.client(cache=True) as caching:
        deadline = time.monotonic() + 5
        while not caching.cache_stats().live:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        results = [caching.verify_key(created.secret).result for _ in range(700)]
        stats = caching.cache_stats()
    assert results.count(R.VERIFY_RESULT_VALID) == 500 or results.count(R.VERIFY_RESULT_VALID) >= 450
    assert results.count(R.VERIFY_RESULT_VALID) <= 500
    assert stats is not None and stats.hits > 500  # most answers came from memory


def test_async_caching_client_honours_limits(server: RunningServer, aio: AioLoop, owner: str) -> None:
    with server.client() as admin:
        created = admin.create_key(owner, "svc", limits=[keystile.rate_limit("w", 300, 60)])

    async def run() -> tuple[list[int], keystile.CacheStats | None]:
        async with keystile.AsyncClient(server.address, cache=True) as caching:
            await caching.verify_key(created.secret)  # starts the subscription
            for _ in range(500):
                stats = caching.cache_stats()
                if stats is not None and stats.live:
                    break
                await asyncio.sleep(0.01)
            results = [(await caching.verify_key(created.secret)).result for _ in range(500)]
            return results, caching.cache_stats()

    results, stats = aio.run(run())
    valid = results.count(R.VERIFY_RESULT_VALID)
    assert 250 <= valid <= 299  # 300 in all, the first call's included; leases stranded at most
    assert results[-1] == R.VERIFY_RESULT_RATE_LIMITED
    assert stats is not None and stats.hits > 300


def test_credits_refill_when_a_new_period_begins(client: keystile.Client, owner: str, db: Db) -> None:
    created = client.create_key(owner, "svc", credits=keystile.credits(0, refill="daily", refill_amount=5))
    # As if the balance was last refilled yesterday: the first lease of today refills it.
    db.execute(
        "UPDATE keystile.key_credits SET refilled_at = now() - interval '1 day' WHERE key_id = %s",
        (created.key.id,),
    )
    assert client.get_credits(created.key.id).remaining == 5  # read as refilled, before any lease
    results = [client.verify_key(created.secret).result for _ in range(8)]
    assert results.count(R.VERIFY_RESULT_VALID) == 5
    assert results[-1] == R.VERIFY_RESULT_USAGE_EXCEEDED
    assert client.get_credits(created.key.id).remaining == 0


def test_lease_units_are_capped(client: keystile.Client, owner: str) -> None:
    secret = client.create_key(owner, "svc", limits=[keystile.rate_limit("w", 10, 60)]).secret
    with pytest.raises(keystile.InvalidArgumentError) as err:
        client._verify(secret, (), "", None, 0, 10_001)
    assert "lease_units" in err.value.field_violations


def test_one_process_holds_units_for_a_bounded_number_of_keys() -> None:
    from datetime import UTC, datetime

    from keystile_server.limits.allowances import Allowances
    from keystile_server.metrics import ServerMetrics
    from keystile_server.model import KeyRecord, RateLimit

    allowances = Allowances(None, metrics=ServerMetrics(), max_keys=2)  # type: ignore[arg-type]
    for i in range(3):
        record = KeyRecord(
            id=f"00000000-0000-4000-8000-00000000000{i}",
            owner_id="o",
            name="n",
            prefix="ks",
            secret_hint="ks_x",
            scopes=(),
            resources=(),
            metadata={},
            rate_limit_per_minute=0,
            create_time=datetime.now(UTC),
            expire_time=None,
            revoke_time=None,
            revoke_reason=None,
            last_used_time=None,
            created_by=None,
            secret_hash=bytes([i]) * 32,
            limits=(RateLimit("w", 10, 1000),),
        )
        allowances._allowance(record)
    assert len(allowances) == 2


def test_remembered_request_shapes_are_capped() -> None:
    from keystile_server import handlers
    from keystile_server.verification import requirements

    servicer = handlers.KeyServiceHandlers()
    for i in range(handlers._MAX_MEMO + 10):
        servicer._remember(i.to_bytes(32, "big"), b"ks_x", requirements(["a:b"], ""), 1)
    assert len(servicer._shapes) <= handlers._MAX_MEMO
