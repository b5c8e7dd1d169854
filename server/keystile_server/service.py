"""The key lifecycle: the domain decisions behind every management RPC.

``KeyService`` authenticates callers, validates requests against the API contract, mints secrets
and shapes pages; presented keys are judged by its ``verifier`` (``verification``). It knows
neither protobuf (the handlers translate) nor SQL (the store does).
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from keystile._format import generate_key, hash_key, parse_key

from .audit import AuditLog
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
from .importing import KeyImporter
from .key_formats import KeyFormats
from .lifecycle import KeyLifecycle
from .limits.allowances import Allowances
from .limits.credits import CreditBalances
from .limits.policies import OwnerPolicies
from .limits.rules import LimitSpec, check_credits, check_limits
from .metrics import ServerMetrics
from .model import CreditTerms, KeyPage, KeyRecord, NewKey, PageCursor, VerifyResult
from .page_tokens import PageTokenCodec
from .store import KeyStore
from .store.audit_store import AuditStore
from .store.import_store import ImportStore
from .store.lifecycle_store import LifecycleStore
from .store.usage_store import UsageStore
from .usage import UsageRecorder
from .validation import (
    Violations,
    check_actor,
    check_hint,
    check_key_id,
    check_metadata,
    check_name,
    check_owner_id,
    check_page_size,
    check_prefix,
    check_resources,
    check_scopes,
    check_secret_hash,
)
from .verification import Verifier
from .watch import KeyEventHub, Subscription

BEARER = "bearer "
BOOTSTRAP: Final = "bootstrap"
"""The creator (and audit actor) recorded for keys minted by `keystile bootstrap`."""
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
    secret_hash: str = ""
    """The SHA-256 of a secret the caller minted itself (hex or base64): none is minted or returned."""
    secret_hint: str = ""
    """What lists show for a caller-minted secret (``secret_hash``)."""


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
        key_formats: KeyFormats | None = None,
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
        self.verifier = Verifier(
            cache,
            usage,
            self.allowances,
            metrics,
            verify_auth_required=self.verify_auth_required,
            authenticate=self.authenticate,
            formats=key_formats,
        )
        """VerifyKey's domain, and the lookup behind every caller's authentication."""
        self.max_staleness = max_staleness
        self.lifecycle = KeyLifecycle(
            LifecycleStore(store.guard, on_query=store.count_query), store, cache, self.authenticate, utc_now
        )
        """UpdateKey, RollKey, RevokeKey, DeleteKey and the retention of dead keys."""
        self.importer = KeyImporter(
            ImportStore(store.guard, on_query=store.count_query), cache, self.authenticate
        )
        """ImportKeys."""
        audit_store = AuditStore(store.guard, on_query=store.count_query)
        self.audit = AuditLog(audit_store.list_events, audit_store.purge, self.authenticate, page_tokens)
        """ListAuditEvents and the audit trail's retention."""
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
        verdict = await self.verifier.lookup(secret, (), "")
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
        own_hash = check_secret_hash(spec.secret_hash, errors) if spec.secret_hash else None
        hint = check_hint(spec.secret_hint, errors)
        if spec.secret_hint and own_hash is None:
            errors.add("secret_hint", "goes with secret_hash (keystile makes the hint of a key it mints)")
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
        created_by = caller.key_id if caller is not None else BOOTSTRAP

        if own_hash is not None:  # the caller minted the secret: keystile never sees it
            secret, secret_hash = "", own_hash
        else:
            secret = generate_key(prefix)
            parsed = parse_key(secret)
            assert parsed is not None
            secret_hash, hint = hash_key(secret), parsed.hint
        record = await self._store.insert_key(
            NewKey(
                id=str(uuid.uuid4()),
                owner_id=owner_id,
                name=name,
                prefix=prefix,
                secret_hash=secret_hash,
                secret_hint=hint,
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
            actor=created_by,
        )
        self._cache.stored(record.secret_hash)
        _log.info("key created id=%s owner=%s hint=%s by=%s", record.id, owner_id, hint, created_by)
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
        self,
        owner_id: str,
        *,
        page_size: int,
        page_token: str,
        include_inactive: bool,
        authorization: str,
        created_by: str = "",
        secret_hint: str = "",
    ) -> KeyPage:
        """One page of keys, newest first, and the token for the next page.

        ``owner_id`` is required, except that an admin may leave it empty to list every owner's
        keys; ``created_by`` and ``secret_hint`` narrow the listing (a leaked key's hint, from a
        log line, finds it).
        """
        caller = await self.authenticate(authorization)
        require_scope(caller, KEYS_READ)
        errors = Violations()
        if owner_id or not caller.is_admin:
            check_owner_id(owner_id, errors)
        limit = check_page_size(page_size, errors)
        if created_by:
            created_by = check_actor(created_by, errors, "created_by")
        check_hint(secret_hint, errors)
        errors.raise_if_any()
        require_owner(caller, owner_id)
        _log.debug("keys listed owner=%s by=%s", owner_id or "*", caller.key_id)
        filters = f"{created_by}|{secret_hint}"
        tokens = {"owner_id": owner_id, "include_inactive": include_inactive, "filters": filters}
        after = self._page_tokens.decode(page_token, **tokens) if page_token else None  # type: ignore[arg-type]
        # One extra row tells whether another page exists without a second query.
        rows = await self._store.list_keys(
            owner_id,
            active_at=None if include_inactive else utc_now(),
            after=after,
            limit=limit + 1,
            tenant=not caller.is_admin,
            created_by=created_by,
            secret_hint=secret_hint,
        )
        keys, more = rows[:limit], len(rows) > limit
        token = ""
        if more:
            last = keys[-1]
            cursor = PageCursor(create_time=last.create_time, id=last.id)
            token = self._page_tokens.encode(cursor, **tokens)  # type: ignore[arg-type]
        return KeyPage(keys=keys, next_page_token=token)

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


_AUTH_FAILURES = {
    VerifyResult.MALFORMED: "CREDENTIALS_MALFORMED",
    VerifyResult.NOT_FOUND: "CREDENTIALS_UNKNOWN",
    VerifyResult.REVOKED: "CREDENTIALS_REVOKED",
    VerifyResult.EXPIRED: "CREDENTIALS_EXPIRED",
    VerifyResult.DISABLED: "CREDENTIALS_DISABLED",
}
