"""The verification path: VerifyKey's domain, and the lookup behind every caller's authentication.

``Verifier`` judges presented keys: format, existence, revoked, expired, scopes, resource (the
rules are in ``verdicts``), then limits (``limits.allowances``). The synchronous path
(``verify_cached``, ``verify_shape``) answers keys the cache holds without suspending; every other
verification, and every management caller's authentication, takes ``lookup``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keystile._format import hash_key

from .auth import KEYS_VERIFY, Caller, require_scope
from .cache import VerificationCache
from .fast_hash import sha256
from .key_formats import KeyFormats
from .limits.allowances import Allowances
from .metrics import ServerMetrics
from .model import KeyRecord, Verification, VerifyResult
from .usage import MIN_WRITE_INTERVAL, UsageRecorder
from .verdicts import (
    MALFORMED,
    MAX_COST,
    MAX_VERDICTS_PER_KEY,
    NOT_FOUND,
    Memo,
    holds_until,
    judge,
    validated_cost,
    validated_requirements,
)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass(frozen=True, slots=True)
class Requirements:
    """Scopes and a resource a caller requires, with the key its verdicts are memoized under.

    Built once per distinct requirement and reused (a gateway route's, a remembered request's):
    the cached path then builds nothing per call.
    """

    scopes: tuple[str, ...]
    resource: str
    memo_key: object
    """What a cache entry memoizes verdicts under: None when nothing is required."""


NOTHING_REQUIRED = Requirements((), "", None)


def requirements(scopes: Sequence[str], resource: str) -> Requirements:
    """The Requirements for these scopes and resource (as presented: validated when first judged)."""
    if not scopes and not resource:
        return NOTHING_REQUIRED
    required = tuple(scopes)
    return Requirements(required, resource, (required, resource))


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What a VerifyKey request asked, remembered by the transport under the request's digest.

    Services send the same few requests again and again (one key, the same scopes): a request
    seen before is answered from its shape without being parsed. Its fields passed validation.
    """

    secret_hash: bytes
    required: Requirements
    cost: int


class Verifier:
    """Judges presented keys for VerifyKey, and looks keys up for caller authentication."""

    def __init__(
        self,
        cache: VerificationCache,
        usage: UsageRecorder,
        allowances: Allowances,
        metrics: ServerMetrics,
        *,
        verify_auth_required: bool,
        authenticate: Callable[[str], Awaitable[Caller]],
        formats: KeyFormats | None = None,
    ) -> None:
        self._cache = cache
        self._usage = usage
        self._allowances = allowances
        self._verdicts = metrics.verifications
        self._auth_required = verify_auth_required
        self._authenticate = authenticate
        self._formats = formats or KeyFormats()
        self._max_length = self._formats.max_length

    async def verify_key(
        self,
        secret: str,
        required_scopes: Sequence[str],
        resource: str,
        *,
        cost: int = 1,
        lease_units: int = 0,
        authorization: str = "",
    ) -> Verification:
        """Judge a presented secret: format, existence, revoked, expired, scopes, resource, limits.

        With ``--verify-auth open`` the presented key is its own credential; with ``required``
        the caller must also hold ``keys:verify``, and once it does, a cached key is answered as
        ``verify_cached`` answers it. A malformed secret costs no query. A VALID key with limits
        or credits spends ``cost`` units (``limits.allowances``), and ``lease_units`` asks for
        more to hand to a caching client.
        """
        cost = validated_cost(cost, lease_units)
        if self._auth_required:
            require_scope(await self._authenticate(authorization), KEYS_VERIFY)
            if not lease_units:
                cached = self.verify_cached(
                    secret.encode(), requirements(required_scopes, resource), cost, caller_authorized=True
                )
                if cached is not None:
                    return cached
        verdict = await self.lookup(secret, required_scopes, resource)
        record = verdict.key
        if verdict.result is VerifyResult.VALID and record is not None and record.limited:
            if lease_units:
                return await self._allowances.lease_for_client(record, cost, lease_units)
            return await self._allowances.admit(record, cost)
        self._verdicts[verdict.result].inc()
        return verdict

    def verify_cached(
        self,
        secret: bytes,
        required: Requirements = NOTHING_REQUIRED,
        cost: int = 1,
        *,
        caller_authorized: bool = False,
    ) -> Verification | None:
        """``verify_key`` for a key the cache holds, without suspending; None when that cannot be.

        ``secret`` is the key's UTF-8 encoding, as it arrives on the wire. The common case is kept
        to a hash, the cache's lookup and one on the entry's memo, and a clock read: a verdict
        already judged for the cached snapshot, scopes and resource is reused while it holds (see
        ``_verdict_for``). Measured on the real server, each further call on this path showed up
        in calls/s. A key the key filter has certainly never seen is answered here as well
        (NOT_FOUND, or MALFORMED). None (use ``verify_key``) when the key is not cached, or when
        ``--verify-auth required`` and only ``verify_key``, having checked the caller, may pass
        ``caller_authorized``.
        """
        if (self._auth_required and not caller_authorized) or len(secret) > self._max_length:
            return None
        # hashlib directly, not hash_key: the hot path's calls show in calls/s (as hash_key's digest)
        return self._cached(sha256(secret).digest(), required, cost, secret)

    def verify_shape(self, shape: RequestShape) -> Verification | None:
        """``verify_cached`` for a request seen before, by what it asked (``RequestShape``)."""
        if self._auth_required:
            return None
        return self._cached(shape.secret_hash, shape.required, shape.cost, None)

    def _cached(
        self, secret_hash: bytes, required: Requirements, cost: int, secret: bytes | None
    ) -> Verification | None:
        entry = self._cache.peek(secret_hash)
        if entry is None:
            # A key the filter has never seen is answered here too: a flood of unknown keys
            # then costs what cache hits cost, not a coroutine and a full parse each.
            if secret is None or not self._cache.certainly_unknown(secret_hash):
                return None
            return self._unknown(secret, required.scopes, required.resource)
        record = entry.record
        if record is None:  # a remembered unknown key
            validated_requirements(required.scopes, required.resource)  # bad scopes make a bad request
            self._verdicts[VerifyResult.NOT_FOUND].inc()
            return NOT_FOUND
        now = time.time()
        memo: Memo | None = entry.verdicts.get(required.memo_key)
        if memo is not None and now < memo.until:
            if now >= memo.next_use:  # a use is worth noting at most once a minute (usage.py)
                memo.next_use = now + MIN_WRITE_INTERVAL
                self._usage.record(record.id, now)
            if memo.limited:  # None: no units in memory, lease on the full path
                units = cost if 0 < cost <= MAX_COST else validated_cost(cost)
                return self._allowances.spend(record, units, time.monotonic())
            memo.counter.value += 1  # HotCounter.inc, inlined on the hottest line
            return memo.verdict
        # Validated here, before anything is stored: a memo hit then needs no validation.
        scopes = validated_requirements(required.scopes, required.resource)
        verdict = self._verdict_for(record, scopes, required.resource, now, entry.verdicts, required.memo_key)
        if verdict.result is VerifyResult.VALID and record.limited:
            return self._allowances.spend(record, validated_cost(cost), time.monotonic())
        self._verdicts[verdict.result].inc()
        return verdict

    def _unknown(self, secret: bytes, required_scopes: Sequence[str], resource: str) -> Verification | None:
        """The verdict on a key no stored key hashes to: MALFORMED or NOT_FOUND, format first."""
        try:
            text = secret.decode()
        except UnicodeDecodeError:
            return None  # the full path refuses the request as unparsable
        validated_requirements(required_scopes, resource)  # bad scopes are a bad request, whatever the key
        verdict = NOT_FOUND if self._formats.accepts(text) else MALFORMED
        self._verdicts[verdict.result].inc()
        return verdict

    async def lookup(self, secret: str, required_scopes: Sequence[str], resource: str) -> Verification:
        """The one full verification path, shared by VerifyKey and caller authentication.

        Ordered for the common case: a cached key skips the format check, because only
        well-formed secrets (ours) ever reach the cache. Anything else is checked for format
        before any query, so malformed keys cost no database work.
        """
        required = validated_requirements(required_scopes, resource)  # bad input is refused before any lookup
        if len(secret) > self._max_length:  # refuse before hashing: no paying for megabyte "keys"
            return MALFORMED
        secret_hash = hash_key(secret)
        entry = self._cache.peek(secret_hash)
        if entry is not None:
            record = entry.record
        elif not self._formats.accepts(secret):
            return MALFORMED
        else:
            record = await self._cache.load(secret_hash)
        return self._verdict_for(record, required, resource, time.time())

    def _verdict_for(
        self,
        record: KeyRecord | None,
        required: Sequence[str],
        resource: str,
        now: float,
        memos: dict[object, Any] | None = None,
        memo_key: object = None,
    ) -> Verification:
        """Judge a snapshot at ``now`` (POSIX seconds) and, given its entry's ``memos``, memoize the verdict.

        ``required`` and ``resource`` have passed validation. Only cached snapshots are memoized
        (``verify_cached`` passes their entry's ``memos``): a snapshot loaded without being cached
        is never seen again. The memo lives on the cache entry, keyed by the scopes and resource
        as presented (None for neither), so it is dropped with the entry; and each verdict holds
        only until ``holds_until``.
        """
        if record is None:
            return NOT_FOUND
        result = judge(record, required, resource, _utc(now))
        verdict = Verification(result, record, memos is not None)
        valid = result is VerifyResult.VALID
        if valid:
            self._usage.record(record.id, now)
        if memos is not None:
            if len(memos) >= MAX_VERDICTS_PER_KEY:  # callers varying scopes without end
                memos.clear()
            memos[memo_key] = Memo(
                verdict,
                holds_until(record, result),
                self._verdicts[result],
                now + MIN_WRITE_INTERVAL if valid else math.inf,
                valid and record.limited,
            )
        return verdict
