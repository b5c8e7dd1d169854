"""The filter of stored key hashes: unknown keys cost no query, and no stored key is ever denied.

The filter's own rules (no false negatives, its false-positive rate, growth) are checked on
``KeyFilter`` directly; what it does for a server (a flood of unknown keys, keys loaded at start,
a bulk import, a key created through another server) is checked against real servers.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable

from fix_cache import armed_cache
from fix_db import Db
from fix_server import AioLoop, RunningServer, eventually

from keystile._format import generate_key, hash_key
from keystile.v1 import keys_pb2
from keystile_server.key_filter import BITS_PER_KEY, MIN_CAPACITY, PAGE, KeyFilter

LOOKUPS = "keystile_db_queries_total{op=find_by_hashes}"
FILTERED = "keystile_cache_lookups_total{outcome=filtered}"
NOT_FOUND = keys_pb2.VERIFY_RESULT_NOT_FOUND
VALID = keys_pb2.VERIFY_RESULT_VALID


def digests(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).digest() for _ in range(n)]


def loaded_filter(stored: list[bytes]) -> KeyFilter:
    """A KeyFilter loaded from ``stored`` through its real paging code."""
    ordered = sorted(stored)

    async def count() -> int:
        return len(ordered)

    async def page(after: bytes, limit: int) -> bytes:
        return b"".join([h for h in ordered if h > after][:limit])

    key_filter = KeyFilter(count, page)

    async def load() -> KeyFilter:
        key_filter.start()
        while not key_filter.ready:  # noqa: ASYNC110 - the loader sets a plain attribute
            await asyncio.sleep(0)
        return key_filter

    return asyncio.run(load())


def test_every_stored_hash_passes_and_unknown_ones_almost_never_do() -> None:
    stored = digests(2 * PAGE + 123, seed=1)  # several pages
    key_filter = loaded_filter(stored)
    assert key_filter.keys == len(stored)
    assert all(key_filter.might_contain(h) for h in stored), "a stored key was denied"
    unknown = digests(100_000, seed=2)
    false_positives = sum(key_filter.might_contain(h) for h in unknown)
    assert false_positives / len(unknown) < 0.005, false_positives
    assert key_filter.size_bytes == max(MIN_CAPACITY, len(stored) * 3 // 2) * BITS_PER_KEY // 8


def test_an_unloaded_or_stopped_filter_denies_nothing() -> None:
    async def count() -> int:
        return 0

    async def page(after: bytes, limit: int) -> bytes:
        return b""

    key_filter = KeyFilter(count, page)
    assert key_filter.might_contain(digests(1, seed=3)[0]), "not loaded: everything may exist"
    loaded = loaded_filter([])
    assert not loaded.might_contain(digests(1, seed=3)[0])
    loaded.stop()
    assert loaded.might_contain(digests(1, seed=3)[0]), "stopped: everything may exist"


def test_a_full_filter_is_rebuilt_larger_and_answers_meanwhile() -> None:
    stored: list[bytes] = []

    async def count() -> int:
        return len(stored)

    async def page(after: bytes, limit: int) -> bytes:
        await asyncio.sleep(0)
        return b"".join(sorted(h for h in stored if h > after)[:limit])

    async def scenario() -> tuple[int, int, bool]:
        key_filter = KeyFilter(count, page)
        key_filter.start()
        while not key_filter.ready:  # noqa: ASYNC110
            await asyncio.sleep(0)
        first_size = key_filter.size_bytes
        added = digests(MIN_CAPACITY * 2 + 10, seed=4)
        for digest in added:  # as the creation events would
            stored.append(digest)
            key_filter.add(digest)
        denied = any(not key_filter.might_contain(h) for h in added)  # during the rebuild too
        for _ in range(10_000):
            if key_filter.size_bytes > first_size and key_filter._building is None:
                break
            await asyncio.sleep(0)
        return first_size, key_filter.size_bytes, denied or not all(map(key_filter.might_contain, added))

    first, grown, denied = asyncio.run(scenario())
    assert grown > first
    assert not denied


def test_a_flood_of_unknown_keys_costs_no_query(fresh: Callable[..., RunningServer], owner: str) -> None:
    server = fresh()
    with server.client() as client:
        real = client.create_key(owner, "real").secret
        before = server.metrics()
        for _ in range(1000):
            assert client.verify_key(generate_key("ks")).result == NOT_FOUND
        assert client.verify_key(real).result == VALID
    after = server.metrics()
    # The one real key's miss may cost a lookup; the thousand unknown keys cost none.
    assert after[LOOKUPS] - before[LOOKUPS] <= 1
    assert after[FILTERED] - before[FILTERED] == 1000


def _insert_keys(db: Db, secrets_: list[str], owner: str) -> None:
    """Insert keys in one statement (as an import would), bypassing the server."""
    db.execute(
        """INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint)
           SELECT gen_random_uuid(), %s, 'imported', 'ks', h, 'ks_x' FROM unnest(%s::bytea[]) AS h""",
        (owner, [hash_key(s) for s in secrets_]),
    )


def test_keys_stored_before_start_are_loaded(
    make_database: Callable[[], str], start_server: Callable[..., RunningServer], owner: str
) -> None:
    from fix_server import server_settings

    url = make_database()
    first = start_server(server_settings(url))  # migrates the new database
    first.stop()
    secrets_ = [generate_key("ks") for _ in range(PAGE + 500)]
    _insert_keys(Db(url), secrets_, owner)
    running = start_server(server_settings(url))
    eventually(lambda: running.metrics()["keystile_key_filter_ready"] == 1)
    assert running.metrics()["keystile_key_filter_keys"] == len(secrets_)
    with running.client() as client:
        for secret in random.sample(secrets_, 30):
            assert client.verify_key(secret).result == VALID
    running.stop()


def test_a_bulk_change_reloads_the_filter(
    fresh: Callable[..., RunningServer], module_db_url: str, owner: str
) -> None:
    """Over 1000 keys in one statement arrive as one '*' event: the filter is loaded afresh."""
    server = fresh()
    secrets_ = [generate_key("ks") for _ in range(1500)]
    _insert_keys(Db(module_db_url), secrets_, owner)
    with server.client() as client:
        eventually(lambda: client.verify_key(secrets_[0]).result == VALID, timeout=5)
        for secret in random.sample(secrets_, 30):
            assert client.verify_key(secret).result == VALID


def test_a_key_created_through_another_server_is_denied_no_longer_than_its_event_takes(
    fresh: Callable[..., RunningServer], owner: str
) -> None:
    creator, verifier = fresh(), fresh()
    with creator.client() as admin, verifier.client() as client:
        for _ in range(10):
            secret = admin.create_key(owner, "fresh elsewhere").secret
            seen = [client.verify_key(secret).result]
            while seen[-1] != VALID:
                assert len(seen) < 1000, "still NOT_FOUND long after the creation event"
                seen.append(client.verify_key(secret).result)
            assert set(seen) <= {NOT_FOUND, VALID}
            for _ in range(5):  # once the event has arrived, it is VALID for good
                assert client.verify_key(secret).result == VALID


def test_the_filter_is_told_of_a_creation_before_the_cache(aio: AioLoop) -> None:
    """The event path adds the hash to the filter, so a lookup right after it is not filtered out."""
    secret = generate_key("ks")
    digest = hash_key(secret)

    async def scenario() -> tuple[object, object, int]:
        looked_up: list[bytes] = []

        async def load(hashes: list[bytes]) -> dict[bytes, object]:
            looked_up.extend(hashes)
            return {}

        async def count() -> int:
            return 0

        async def page(after: bytes, limit: int) -> bytes:
            return b""

        key_filter = KeyFilter(count, page)
        key_filter.start()
        while not key_filter.ready:  # noqa: ASYNC110
            await asyncio.sleep(0)
        cache = armed_cache(load, key_filter=key_filter)
        before_event = await cache.get(digest)  # filtered: no lookup
        lookups_before = len(looked_up)
        key_filter.add(digest)  # the creation event
        cache.invalidate(digest)
        after_event = await cache.get(digest)  # now looked up
        return before_event, after_event, len(looked_up) - lookups_before

    before, after, lookups = aio.run(scenario())
    assert before is None and after is None
    assert lookups == 1


def test_the_filter_holds_only_hashes(fresh: Callable[..., RunningServer], owner: str) -> None:
    """Nothing secret lives in the filter: it is bits derived from SHA-256 digests."""
    server = fresh()
    with server.client() as client:
        secret = client.create_key(owner, "hidden").secret
    key_filter = server.server._filter
    assert key_filter is not None and key_filter._live is not None
    assert secret.encode() not in bytes(key_filter._live.bits)


def test_a_failed_load_is_retried() -> None:
    from keystile_server.errors import StoreUnavailable

    calls = 0

    async def count() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable()  # the database was busy or away at start
        return 1

    stored = digests(1, seed=5)[0]

    async def page(after: bytes, limit: int) -> bytes:
        return stored if after < stored else b""

    async def scenario() -> tuple[bool, bool]:
        key_filter = KeyFilter(count, page)
        key_filter.start()
        await asyncio.sleep(0.1)
        failed_first = not key_filter.ready
        async with asyncio.timeout(5):
            while not key_filter.ready:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return failed_first, key_filter.might_contain(stored)

    failed_first, contains = asyncio.run(scenario())
    assert failed_first and contains and calls == 2
