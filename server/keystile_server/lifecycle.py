"""A key's life after creation: update, disable and enable, roll, revoke (with cascade), delete.

Every action authenticates its caller, validates like CreateKey does (the same field checks and
the same no-escalation rule), and leaves the change to the store, which makes it in one
transaction with its audit event. Caches learn of each change from the keys table's trigger in
that same commit, so an update or a disable reaches every server and caching client with the
bound of a revocation; this process evicts at once as well.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from keystile._format import generate_key, hash_key, parse_key

from .auth import KEYS_WRITE, Caller, check_no_escalation, require_scope
from .cache import VerificationCache
from .errors import KeyNotFound
from .limits.rules import PER_MINUTE, check_limits
from .model import KeyRecord
from .store import KeyStore
from .store.lifecycle_store import KeyUpdate, LifecycleStore
from .validation import (
    Violations,
    check_key_id,
    check_metadata,
    check_name,
    check_reason,
    check_resources,
    check_scopes,
)

UPDATABLE: Final = ("name", "scopes", "resources", "metadata", "expire_time", "limits", "disabled")
"""The fields UpdateKey's update_mask may name."""
MAX_GRACE_PERIOD: Final = timedelta(days=30)

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RolledKey:
    """A roll's outcome: the new key and its secret (this once), and the old key as changed."""

    key: KeyRecord
    secret: str
    replaced: KeyRecord

    def __repr__(self) -> str:
        return f"RolledKey(key={self.key.id}, replaced={self.replaced.id})"


class KeyLifecycle:
    """UpdateKey, RollKey, RevokeKey, DeleteKey and the retention of dead keys."""

    def __init__(
        self,
        store: LifecycleStore,
        keys: KeyStore,
        cache: VerificationCache,
        authenticate: Callable[[str], Awaitable[Caller]],
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._keys = keys
        self._cache = cache
        self._authenticate = authenticate
        self._now = clock

    async def _writer(self, authorization: str) -> Caller:
        caller = await self._authenticate(authorization)
        require_scope(caller, KEYS_WRITE)
        return caller

    @staticmethod
    def _key_id(key_id: str, field: str = "id") -> str:
        """The canonical id; a string that names no key is NOT_FOUND, as for GetKey."""
        errors = Violations()
        canonical = check_key_id(key_id, errors, field)
        errors.raise_if_any()
        if canonical is None:
            raise KeyNotFound()
        return canonical

    async def update_key(
        self, key_id: str, paths: Sequence[str], values: Mapping[str, Any], *, authorization: str
    ) -> KeyRecord:
        """Change the fields named in ``paths`` (an update mask) to ``values``.

        ``values`` holds the request's value for each path: name (str), scopes and resources
        (lists of str), metadata (dict), expire_time (datetime, or None for never), limits
        (LimitSpecs) and disabled (bool). Checks are CreateKey's, then no-escalation: a
        non-admin may only give a key what its own key has.
        """
        caller = await self._writer(authorization)
        now = self._now()
        canonical = self._key_id(key_id, "key.id")
        errors = Violations()
        if not paths:
            errors.add("update_mask", f"must name at least one of: {', '.join(UPDATABLE)}")
        unknown = [path for path in paths if path not in UPDATABLE]
        if unknown:
            errors.add(
                "update_mask", f"cannot update {', '.join(unknown)}; updatable: {', '.join(UPDATABLE)}"
            )
        if len(set(paths)) != len(paths):
            errors.add("update_mask", "names a field twice")
        errors.raise_if_any()
        columns: dict[str, Any] = {}
        if "name" in paths:
            columns["name"] = check_name(values["name"], errors, "key.name")
        if "scopes" in paths:
            columns["scopes"] = check_scopes(values["scopes"], errors, "key.scopes")
        if "resources" in paths:
            columns["resources"] = check_resources(values["resources"], errors, "key.resources")
        if "metadata" in paths:
            columns["metadata"] = check_metadata(values["metadata"], errors, "key.metadata")
        if "expire_time" in paths:
            expire_time = values["expire_time"]
            if expire_time is not None and expire_time <= now:
                errors.add("key.expire_time", "must lie in the future (clear it for never)")
            columns["expire_time"] = expire_time
        if "limits" in paths:
            limits = check_limits(values["limits"], errors, field="key.limits")
            columns["limits"] = limits
            columns["rate_limit_per_minute"] = next(
                (x.limit for x in limits if x.name == PER_MINUTE and x.window_ms == 60_000 and not x.burst), 0
            )
        errors.raise_if_any()
        check_no_escalation(
            caller,
            owner_id=caller.owner_id,  # the store keeps a tenant to its own owner's keys
            scopes=columns.get("scopes", ()),
            resources=columns.get("resources", caller.resources),
            expire_time=columns.get("expire_time", caller.expire_time),
            expiry_field="key.expire_time",
            limits=columns.get("limits", caller.limits),
            credits=caller.credits,
        )
        disabled = bool(values["disabled"]) if "disabled" in paths else None
        after = await self._store.update_key(
            canonical,
            KeyUpdate(columns, disabled),
            owner_id=None if caller.is_admin else caller.owner_id,
            actor=caller.key_id,
            now=now,
        )
        if after is None:
            raise KeyNotFound()
        self._cache.invalidate(after.secret_hash)  # this process, before UpdateKey returns
        _log.info(
            "key updated id=%s owner=%s fields=%s by=%s",
            after.id,
            after.owner_id,
            ",".join(paths),
            caller.key_id,
        )
        return after

    async def roll_key(self, key_id: str, grace_period: timedelta | None, *, authorization: str) -> RolledKey:
        """Mint a new secret for the key's grant; the old one works for ``grace_period`` only.

        Rolling hands the caller a secret with the key's whole grant, so a non-admin may only
        roll a key no stronger than its own (no-escalation, as for CreateKey).
        """
        caller = await self._writer(authorization)
        now = self._now()
        canonical = self._key_id(key_id)
        grace = grace_period or timedelta(0)
        if not timedelta(0) <= grace <= MAX_GRACE_PERIOD:
            errors = Violations()
            errors.add("grace_period", "must be between 0 and 30 days")
            errors.raise_if_any()
        owner = None if caller.is_admin else caller.owner_id
        current = await self._keys.get_key(canonical, owner_id=owner)
        if current is None:
            raise KeyNotFound()
        check_no_escalation(
            caller,
            owner_id=current.owner_id,
            scopes=current.scopes,
            resources=current.resources,
            expire_time=current.expire_time,
            expiry_field="id",
            limits=current.limits,
            credits=current.credits,
        )
        secret = generate_key(current.prefix)
        parsed = parse_key(secret)
        assert parsed is not None
        rolled = await self._store.roll_key(
            canonical,
            secret_hash=hash_key(secret),
            secret_hint=parsed.hint,
            until=now + grace,
            owner_id=owner,
            actor=caller.key_id,
            now=now,
        )
        if rolled is None:
            raise KeyNotFound()
        old, new = rolled
        self._cache.invalidate(old.secret_hash)
        self._cache.stored(new.secret_hash)
        _log.info("key rolled id=%s into=%s grace=%s by=%s", old.id, new.id, grace, caller.key_id)
        return RolledKey(new, secret, old)

    async def revoke_key(
        self, key_id: str, reason: str, *, cascade: bool, authorization: str
    ) -> tuple[KeyRecord, list[KeyRecord]]:
        """Revoke a key (again: no change) and, with ``cascade``, all it created, transitively."""
        caller = await self._writer(authorization)
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        clean_reason = check_reason(reason, errors)
        errors.raise_if_any()
        owner = None if caller.is_admin else caller.owner_id
        revoked = (
            await self._store.revoke_key(
                canonical, clean_reason, owner_id=owner, cascade=cascade, actor=caller.key_id
            )
            if canonical
            else None
        )
        if revoked is None:
            raise KeyNotFound()
        record, cascaded = revoked
        # The NOTIFY reaches every process within milliseconds; evicting here as well means this
        # process refuses the keys before RevokeKey even returns.
        for key in (record, *cascaded):
            self._cache.invalidate(key.secret_hash)
        _log.info(
            "key revoked id=%s owner=%s cascaded=%d by=%s",
            record.id,
            record.owner_id,
            len(cascaded),
            caller.key_id,
        )
        return record, cascaded

    async def delete_key(self, key_id: str, *, authorization: str) -> None:
        """Delete a revoked or expired key for good; its audit events stay."""
        caller = await self._writer(authorization)
        canonical = self._key_id(key_id)
        owner = None if caller.is_admin else caller.owner_id
        if not await self._store.delete_key(canonical, owner_id=owner, actor=caller.key_id, now=self._now()):
            raise KeyNotFound()
        _log.info("key deleted id=%s by=%s", canonical, caller.key_id)

    async def purge(self, retention: timedelta) -> int:
        """Delete keys revoked, or expired, longer than ``retention`` ago; how many went."""
        purged = await self._store.purge_keys(self._now() - retention, actor="retention")
        if purged:
            _log.info("key retention: %d keys revoked or expired before %s deleted", purged, retention)
        return purged
