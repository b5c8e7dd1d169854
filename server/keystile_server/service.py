"""The key lifecycle: the domain decisions behind every RPC.

``KeyService`` validates requests against the API contract, mints secrets, judges presented keys
and shapes pages. It knows neither protobuf (the handlers translate) nor SQL (the store does).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from keystile._format import generate_key, hash_key, parse_key

from .errors import KeyNotFound
from .model import KeyPage, KeyRecord, KeyState, NewKey, PageCursor, Verification, VerifyResult
from .page_tokens import PageTokenCodec
from .store import KeyStore
from .usage import UsageRecorder
from .validation import (
    Violations,
    check_key_id,
    check_metadata,
    check_name,
    check_owner_id,
    check_page_size,
    check_prefix,
    check_reason,
    check_resource,
    check_resources,
    check_scopes,
    scope_covers,
)

_log = logging.getLogger(__name__)


def utc_now() -> datetime:
    """The clock every expiry decision reads."""
    return datetime.now(UTC)


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
    created_by: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key and its secret: the one moment the secret exists outside the caller."""

    key: KeyRecord
    secret: str = field(repr=False)


class KeyService:
    """Creates, reads, lists, revokes and verifies keys."""

    def __init__(
        self, store: KeyStore, *, default_prefix: str, page_tokens: PageTokenCodec, usage: UsageRecorder
    ) -> None:
        self._store = store
        self._default_prefix = default_prefix
        self._page_tokens = page_tokens
        self._usage = usage

    async def create_key(self, spec: KeySpec) -> CreatedKey:
        """Validate ``spec``, mint a secret, and store only its hash and hint."""
        now = utc_now()
        errors = Violations()
        owner_id = check_owner_id(spec.owner_id, errors)
        name = check_name(spec.name, errors)
        scopes = check_scopes(spec.scopes, errors)
        resources = check_resources(spec.resources, errors)
        prefix = check_prefix(spec.prefix, self._default_prefix, errors)
        metadata = check_metadata(spec.metadata, errors)
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
                created_by=spec.created_by,
            )
        )
        _log.info(
            "key created id=%s owner=%s hint=%s by=%s", record.id, owner_id, parsed.hint, spec.created_by
        )
        return CreatedKey(key=record, secret=secret)

    async def get_key(self, key_id: str) -> KeyRecord:
        """The key with this id; KeyNotFound when there is none."""
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        errors.raise_if_any()
        record = await self._store.get_key(canonical) if canonical else None
        if record is None:
            raise KeyNotFound()
        return record

    async def list_keys(
        self, owner_id: str, *, page_size: int, page_token: str, include_inactive: bool
    ) -> KeyPage:
        """One page of an owner's keys, newest first, and the token for the next page."""
        errors = Violations()
        check_owner_id(owner_id, errors)
        limit = check_page_size(page_size, errors)
        errors.raise_if_any()
        after = (
            self._page_tokens.decode(page_token, owner_id=owner_id, include_inactive=include_inactive)
            if page_token
            else None
        )
        # One extra row tells whether another page exists without a second query.
        rows = await self._store.list_keys(
            owner_id, active_at=None if include_inactive else utc_now(), after=after, limit=limit + 1
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

    async def revoke_key(self, key_id: str, reason: str, *, revoked_by: str | None = None) -> KeyRecord:
        """Revoke a key; revoking it again succeeds and keeps the first time and reason."""
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        clean_reason = check_reason(reason, errors)
        errors.raise_if_any()
        record = await self._store.revoke_key(canonical, clean_reason) if canonical else None
        if record is None:
            raise KeyNotFound()
        _log.info("key revoked id=%s owner=%s by=%s", record.id, record.owner_id, revoked_by)
        return record

    async def verify_key(self, secret: str, required_scopes: Sequence[str], resource: str) -> Verification:
        """Judge a presented secret: format, existence, revoked, expired, scopes, resource.

        A malformed secret is answered before any database work, so garbage costs no query.
        """
        errors = Violations()
        required = check_scopes(required_scopes, errors, field="required_scopes")
        if resource:
            check_resource(resource, errors, "resource")
        errors.raise_if_any()
        if parse_key(secret) is None:
            return Verification(VerifyResult.MALFORMED)
        record = await self._store.find_by_hash(hash_key(secret))
        if record is None:
            return Verification(VerifyResult.NOT_FOUND)
        now = utc_now()
        verdict = judge(record, required, resource, now)
        if verdict is VerifyResult.VALID:
            self._usage.record(record.id, now)
        return Verification(verdict, record)


def judge(record: KeyRecord, required: Sequence[str], resource: str, now: datetime) -> VerifyResult:
    """The verdict for an existing key, checks in contract order (a revoked key is REVOKED first)."""
    state = record.state(now)
    if state is KeyState.REVOKED:
        return VerifyResult.REVOKED
    if state is KeyState.EXPIRED:
        return VerifyResult.EXPIRED
    if not all(scope_covers(record.scopes, scope) for scope in required):
        return VerifyResult.INSUFFICIENT_SCOPE
    if resource and record.resources and resource not in record.resources:
        return VerifyResult.FORBIDDEN_RESOURCE
    return VerifyResult.VALID
