"""Owner policies: the rules an admin sets for every key of one owner.

A policy caps the owner's active keys and the lifetime of its new keys (both enforced by
CreateKey, in the store's insert transaction), and carries rate limits shared by all of the
owner's keys (spent on every verification, like a key's own). Setting or clearing one is a key
event for each of the owner's keys, so every cache picks up the shared limits at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from ..auth import KEYS_READ, Caller, require_admin, require_owner, require_scope
from ..errors import PolicyNotFound
from ..model import OwnerPolicy
from ..store.usage_store import UsageStore
from ..validation import Violations, check_owner_id
from .rules import LimitSpec, check_limits

Authenticate = Callable[[str], Awaitable[Caller]]
MAX_KEY_LIFETIME: timedelta = timedelta(days=3650)
MAX_ACTIVE_KEYS = 1_000_000_000

_log = logging.getLogger(__name__)


class OwnerPolicies:
    """SetOwnerPolicy, GetOwnerPolicy and DeleteOwnerPolicy."""

    def __init__(self, store: UsageStore, authenticate: Authenticate) -> None:
        self._store = store
        self._authenticate = authenticate

    async def set(
        self,
        owner_id: str,
        *,
        max_active_keys: int,
        max_key_lifetime: timedelta | None,
        limits: Sequence[LimitSpec],
        authorization: str,
    ) -> OwnerPolicy:
        """Replace the owner's policy (admin only)."""
        caller = await self._authenticate(authorization)
        require_admin(caller, "only an admin key may change owner policies")
        errors = Violations()
        check_owner_id(owner_id, errors, "policy.owner_id")
        if max_active_keys > MAX_ACTIVE_KEYS:
            errors.add("policy.max_active_keys", f"must be at most {MAX_ACTIVE_KEYS}")
        # Stored in whole milliseconds: less than one would be stored as 0, which the table refuses.
        if (
            max_key_lifetime is not None
            and not timedelta(milliseconds=1) <= max_key_lifetime <= MAX_KEY_LIFETIME
        ):
            errors.add("policy.max_key_lifetime", "must be 1 ms to 3650 days")
        checked = check_limits(limits, errors, field="policy.limits")
        errors.raise_if_any()
        policy = await self._store.set_policy(
            OwnerPolicy(owner_id, max_active_keys, max_key_lifetime, checked), actor=caller.key_id
        )
        _log.info("owner policy set owner=%s by=%s", owner_id, caller.key_id)
        return policy

    async def get(self, owner_id: str, *, authorization: str) -> OwnerPolicy:
        """The owner's policy: admins, or keys:read callers for their own owner."""
        caller = await self._authenticate(authorization)
        require_scope(caller, KEYS_READ)
        errors = Violations()
        check_owner_id(owner_id, errors)
        errors.raise_if_any()
        require_owner(caller, owner_id)
        policy = await self._store.get_policy(owner_id)
        if policy is None:
            raise PolicyNotFound()
        return policy

    async def delete(self, owner_id: str, *, authorization: str) -> None:
        """Remove the owner's policy (admin only); removing none succeeds."""
        caller = await self._authenticate(authorization)
        require_admin(caller, "only an admin key may change owner policies")
        errors = Violations()
        check_owner_id(owner_id, errors)
        errors.raise_if_any()
        await self._store.delete_policy(owner_id, actor=caller.key_id)
        _log.info("owner policy deleted owner=%s by=%s", owner_id, caller.key_id)
