"""The key lifecycle: the domain decisions behind every RPC.

``KeyService`` validates requests against the API contract, mints secrets, judges presented keys
and shapes pages. It knows neither protobuf (the handlers translate) nor SQL (the store does).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from keystile._format import MAX_KEY_LENGTH, generate_key, hash_key, parse_key

from .auth import (
    KEYS_READ,
    KEYS_VERIFY,
    KEYS_WRITE,
    STATIC_ADMIN_ID,
    Caller,
    check_no_escalation,
    require_owner,
    require_scope,
)
from .cache import VerificationCache
from .errors import AdminKeyExists, KeyNotFound, Unauthenticated
from .limits.allowances import Allowances
from .limits.credits import CreditBalances
from .limits.policies import OwnerPolicies
from .limits.rules import LimitSpec, check_credits, check_limits
from .metrics import ServerMetrics
from .model import CreditTerms, KeyPage, KeyRecord, NewKey, PageCursor, Verification, VerifyResult
from .page_tokens import PageTokenCodec
from .store import KeyStore
from .store.usage_store import UsageStore
from .usage import MIN_WRITE_INTERVAL, UsageRecorder
from .validation import (
    Violations,
    check_key_id,
    check_metadata,
    check_name,
    check_owner_id,
    check_page_size,
    check_prefix,
    check_reason,
    check_resources,
    check_scopes,
)
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
from .watch import KeyEventHub, Subscription

BEARER = "bearer "
DEFAULT_HEARTBEAT: Final = timedelta(seconds=5)
MIN_HEARTBEAT: Final = timedelta(seconds=1)
MAX_HEARTBEAT: Final = timedelta(seconds=60)

_log = logging.getLogger(__name__)


def utc_now() -> datetime:
    """The clock every expiry decision reads."""
    return datetime.now(UTC)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a CreateKey caller asked for, before validation."""

    owner_id: str
    name: str
    scopes: Sequence[str] = ()
    resources: Sequence[str] = ()
    prefix: str = ""
    ttl: timedelta | None = None
    expire_time: datetime | None = None
    rate_limit_per_minute: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    limits: Sequence[LimitSpec] = ()
    credits: CreditTerms | None = None


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What a VerifyKey request asked, remembered by the transport under the request's digest.

    Services send the same few requests again and again (one key, the same scopes): a request
    seen before is answered from its shape without being parsed. Its fields passed validation.
    """

    secret_hash: bytes
    scopes: tuple[str, ...]
    resource: str
    cost: int
    memo_key: object


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key and its secret: the one moment the secret exists outside the caller."""

    key: KeyRecord
    secret: str = field(repr=False)


class KeyService:
    """Creates, reads, lists, revokes and verifies keys, for authenticated callers.

    Every management method takes the caller's raw ``authorization`` value and authenticates it
    here, so that which RPC needs which scope is decided in one layer, not in each handler.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        default_prefix: str,
        page_tokens: PageTokenCodec,
        usage: UsageRecorder,
        cache: VerificationCache,
        events: KeyEventHub,
        metrics: ServerMetrics,
        usage_store: UsageStore,
        verify_auth: str = "open",
        static_admin_key: str | None = None,
        max_staleness: timedelta = timedelta(seconds=30),
    ) -> None:
        self._store = store
        self._cache = cache
        self._events = events
        self._verdicts = metrics.verifications
        self._default_prefix = default_prefix
        self._page_tokens = page_tokens
        self._usage = usage
        self.allowances = self._allowances = Allowances(usage_store, metrics=metrics)
        """The units this process leased for keys with limits; key events drop a key's."""
        self.policies = OwnerPolicies(usage_store, self.authenticate)
        self.credits = CreditBalances(usage_store, self.authenticate, self._key_exists)
        self.verify_auth_required = verify_auth == "required"
        self.max_staleness = max_staleness
        # Kept only as a digest: compared in constant time, and never printable from this object.
        self._static_admin_digest = hash_key(static_admin_key) if static_admin_key else None

    async def authenticate(self, authorization: str) -> Caller:
        """The caller named by ``Bearer <key>``, through the same lookup as VerifyKey."""
        if not authorization:
            raise Unauthenticated("CREDENTIALS_MISSING")
        if authorization[: len(BEARER)].lower() != BEARER:
            raise Unauthenticated("CREDENTIALS_MALFORMED")
        secret = authorization[len(BEARER) :].strip()
        if self._static_admin_digest is not None and hmac.compare_digest(
            hash_key(secret), self._static_admin_digest
        ):
            return Caller(key_id=STATIC_ADMIN_ID, owner_id="", scopes=("admin",))
        verdict = await self._lookup(secret, (), "")
        if verdict.result is VerifyResult.VALID:
            assert verdict.key is not None
            key = verdict.key
            return Caller(
                key.id,
                key.owner_id,
                key.scopes,
                key.resources,
                key.expire_time,
                key.secret_hash,
                key.limits,
                key.credits,
            )
        raise Unauthenticated(_AUTH_FAILURES.get(verdict.result, "CREDENTIALS_UNKNOWN"))

    async def create_key(self, spec: KeySpec, *, authorization: str) -> CreatedKey:
        """Validate ``spec``, check the caller may mint it, and store only the hash and hint."""
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_WRITE)
        return await self._create(spec, caller=caller)

    async def bootstrap_admin(self, owner_id: str, name: str, *, force: bool = False) -> CreatedKey:
        """Mint an admin key with no caller: for `keystile bootstrap`, which holds database access."""
        if not force and await self._store.has_active_admin_key(utc_now()):
            raise AdminKeyExists()
        return await self._create(KeySpec(owner_id=owner_id, name=name, scopes=["admin"]), caller=None)

    async def _create(self, spec: KeySpec, *, caller: Caller | None) -> CreatedKey:
        now = utc_now()
        errors = Violations()
        owner_id = check_owner_id(spec.owner_id, errors)
        name = check_name(spec.name, errors)
        scopes = check_scopes(spec.scopes, errors)
        resources = check_resources(spec.resources, errors)
        prefix = check_prefix(spec.prefix, self._default_prefix, errors)
        metadata = check_metadata(spec.metadata, errors)
        limits = check_limits(spec.limits, errors, per_minute=spec.rate_limit_per_minute)
        credits = check_credits(spec.credits, errors)
        expire_time = spec.expire_time
        if spec.ttl is not None:
            if spec.ttl <= timedelta(0):
                errors.add("ttl", "must be positive")
            else:
                try:
                    expire_time = now + spec.ttl
                except OverflowError:
                    errors.add("ttl", "is too long")
        elif expire_time is not None and expire_time <= now:
            errors.add("expire_time", "must lie in the future")
        errors.raise_if_any()
        if caller is not None:
            check_no_escalation(
                caller,
                owner_id=owner_id,
                scopes=scopes,
                resources=resources,
                expire_time=expire_time,
                expiry_field="ttl" if spec.ttl is not None else "expire_time",
                limits=limits,
                credits=credits,
            )
        created_by = caller.key_id if caller is not None else "bootstrap"

        secret = generate_key(prefix)
        parsed = parse_key(secret)
        assert parsed is not None
        record = await self._store.insert_key(
            NewKey(
                id=str(uuid.uuid4()),
                owner_id=owner_id,
                name=name,
                prefix=prefix,
                secret_hash=hash_key(secret),
                secret_hint=parsed.hint,
                scopes=scopes,
                resources=resources,
                metadata=metadata,
                rate_limit_per_minute=spec.rate_limit_per_minute,
                expire_time=expire_time,
                created_by=created_by,
                limits=limits,
                credits=credits,
            ),
            now=now,
            expiry_field="ttl" if spec.ttl is not None else "expire_time",
        )
        self._cache.stored(record.secret_hash)
        _log.info("key created id=%s owner=%s hint=%s by=%s", record.id, owner_id, parsed.hint, created_by)
        return CreatedKey(key=record, secret=secret)

    async def get_key(self, key_id: str, *, authorization: str) -> KeyRecord:
        """The key with this id; KeyNotFound when there is none or it belongs to another owner."""
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_READ)
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        errors.raise_if_any()
        # Another owner's key answers exactly like an unknown id, in the same time: the owner is
        # part of the query, so neither finds a row (no existence oracle).
        owner = None if caller.is_admin else caller.owner_id
        record = await self._store.get_key(canonical, owner_id=owner) if canonical else None
        if record is None:
            raise KeyNotFound()
        _log.debug("key read id=%s by=%s", record.id, caller.key_id)
        return record

    async def _key_exists(self, key_id: str, owner_id: str | None) -> bool:
        return await self._store.get_key(key_id, owner_id=owner_id) is not None

    async def list_keys(
        self, owner_id: str, *, page_size: int, page_token: str, include_inactive: bool, authorization: str
    ) -> KeyPage:
        """One page of an owner's keys, newest first, and the token for the next page."""
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_READ)
        errors = Violations()
        check_owner_id(owner_id, errors)
        limit = check_page_size(page_size, errors)
        errors.raise_if_any()
        require_owner(caller, owner_id)
        _log.debug("keys listed owner=%s by=%s", owner_id, caller.key_id)
        after = (
            self._page_tokens.decode(page_token, owner_id=owner_id, include_inactive=include_inactive)
            if page_token
            else None
        )
        # One extra row tells whether another page exists without a second query.
        rows = await self._store.list_keys(
            owner_id,
            active_at=None if include_inactive else utc_now(),
            after=after,
            limit=limit + 1,
            tenant=not caller.is_admin,
        )
        keys, more = rows[:limit], len(rows) > limit
        token = ""
        if more:
            last = keys[-1]
            token = self._page_tokens.encode(
                PageCursor(create_time=last.create_time, id=last.id),
                owner_id=owner_id,
                include_inactive=include_inactive,
            )
        return KeyPage(keys=keys, next_page_token=token)

    async def revoke_key(self, key_id: str, reason: str, *, authorization: str) -> KeyRecord:
        """Revoke a key; revoking it again succeeds and keeps the first time and reason."""
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_WRITE)
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        clean_reason = check_reason(reason, errors)
        errors.raise_if_any()
        # The owner condition is part of the UPDATE, so another owner's key is never touched.
        owner = None if caller.is_admin else caller.owner_id
        record = await self._store.revoke_key(canonical, clean_reason, owner_id=owner) if canonical else None
        if record is None:
            raise KeyNotFound()
        # The NOTIFY reaches every process within milliseconds; evicting here as well means this
        # process refuses the key before RevokeKey even returns.
        self._cache.invalidate(record.secret_hash)
        _log.info("key revoked id=%s owner=%s by=%s", record.id, record.owner_id, caller.key_id)
        return record

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
        if self.verify_auth_required:
            require_scope(await self.authenticate(authorization), KEYS_VERIFY)
            if not lease_units:
                cached = self.verify_cached(
                    secret.encode(), required_scopes, resource, cost, caller_authorized=True
                )
                if cached is not None:
                    return cached
        verdict = await self._lookup(secret, required_scopes, resource)
        record = verdict.key
        if verdict.result is VerifyResult.VALID and record is not None and record.limited:
            if lease_units:
                return await self._allowances.lease_for_client(record, cost, lease_units)
            return await self._allowances.admit(record, cost)
        self._verdicts[verdict.result].inc()
        return verdict

    async def watch_key_events(
        self, heartbeat_interval: timedelta | None, *, authorization: str = ""
    ) -> tuple[Subscription, timedelta]:
        """Subscribe to key changes, under the same access rule as VerifyKey.

        Events carry only key hashes, which tell nothing to anyone who does not already hold the
        secret, so a caller allowed to verify keys may watch them. With ``--verify-auth
        required`` the stream lasts only as long as the caller's key: it ends when that key
        changes (the client resubscribes and is authenticated afresh) or expires. Returns the
        subscription and the heartbeat interval it will keep.
        """
        interval = DEFAULT_HEARTBEAT if heartbeat_interval is None else heartbeat_interval
        if not MIN_HEARTBEAT <= interval <= MAX_HEARTBEAT:
            errors = Violations()
            errors.add("heartbeat_interval", "must be between 1 and 60 seconds")
            errors.raise_if_any()
        if not self.verify_auth_required:
            return self._events.subscribe(), interval
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_VERIFY)
        expires = caller.expire_time.timestamp() if caller.expire_time is not None else None
        return self._events.subscribe(credential=caller.key_hash, credential_expires=expires), interval

    def verify_cached(
        self,
        secret: bytes,
        required_scopes: Sequence[str] = (),
        resource: str = "",
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
        if (self.verify_auth_required and not caller_authorized) or len(secret) > MAX_KEY_LENGTH:
            return None
        memo_key = (tuple(required_scopes), resource) if required_scopes or resource else None
        return self._cached(hash_key(secret), memo_key, required_scopes, resource, cost, secret)

    def verify_shape(self, shape: RequestShape) -> Verification | None:
        """``verify_cached`` for a request seen before, by what it asked (``RequestShape``)."""
        if self.verify_auth_required:
            return None
        return self._cached(shape.secret_hash, shape.memo_key, shape.scopes, shape.resource, shape.cost, None)

    def _cached(
        self,
        secret_hash: bytes,
        memo_key: object,
        required_scopes: Sequence[str],
        resource: str,
        cost: int,
        secret: bytes | None,
    ) -> Verification | None:
        entry = self._cache.peek(secret_hash)
        if entry is None:
            # A key the filter has never seen is answered here too: a flood of unknown keys
            # then costs what cache hits cost, not a coroutine and a full parse each.
            if secret is None or not self._cache.certainly_unknown(secret_hash):
                return None
            return self._unknown(secret, required_scopes, resource)
        record = entry.record
        if record is None:  # a remembered unknown key
            validated_requirements(required_scopes, resource)  # still, bad scopes make a bad request
            self._verdicts[VerifyResult.NOT_FOUND].inc()
            return NOT_FOUND
        now = time.time()
        memo: Memo | None = entry.verdicts.get(memo_key)
        if memo is not None and now < memo.until:
            if now >= memo.next_use:  # a use is worth noting at most once a minute (usage.py)
                memo.next_use = now + MIN_WRITE_INTERVAL
                self._usage.record(record.id, now)
            if memo.limited:  # None: no units in memory, lease on the full path
                units = cost if 0 < cost <= MAX_COST else validated_cost(cost)
                return self._allowances.spend(record, units, time.monotonic())
            memo.counter.inc()
            return memo.verdict
        # Validated here, before anything is stored: a memo hit then needs no validation.
        required = validated_requirements(required_scopes, resource)
        verdict = self._verdict_for(record, required, resource, now, entry.verdicts, memo_key)
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
        verdict = MALFORMED if parse_key(text) is None else NOT_FOUND
        self._verdicts[verdict.result].inc()
        return verdict

    async def _lookup(self, secret: str, required_scopes: Sequence[str], resource: str) -> Verification:
        """The one full verification path, shared by VerifyKey and caller authentication.

        Ordered for the common case: a cached key skips the format check, because only
        well-formed secrets (ours) ever reach the cache. Anything else is checked for format
        before any query, so malformed keys cost no database work.
        """
        required = validated_requirements(required_scopes, resource)  # bad input is refused before any lookup
        if len(secret) > MAX_KEY_LENGTH:  # refuse before hashing: no paying for megabyte "keys"
            return MALFORMED
        secret_hash = hash_key(secret)
        entry = self._cache.peek(secret_hash)
        if entry is not None:
            record = entry.record
        elif parse_key(secret) is None:
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


_AUTH_FAILURES = {
    VerifyResult.MALFORMED: "CREDENTIALS_MALFORMED",
    VerifyResult.NOT_FOUND: "CREDENTIALS_UNKNOWN",
    VerifyResult.REVOKED: "CREDENTIALS_REVOKED",
    VerifyResult.EXPIRED: "CREDENTIALS_EXPIRED",
}
