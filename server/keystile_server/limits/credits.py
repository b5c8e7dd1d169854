"""Credit balances: reading one (owners see their own keys') and changing one (admins only).

Spending happens on the verification path (``allowances``); the balance read here is what is
neither spent nor leased. A change is announced as a key event: every process drops the units
and refusals it held for the key, so credits added to an exhausted key work at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..auth import KEYS_READ, require_admin, require_scope
from ..errors import KeyNotFound, NoCredits
from ..model import CreditTerms
from ..store.usage_store import UsageStore
from ..validation import Violations, check_key_id
from .policies import Authenticate
from .rules import MAX_COUNT

KeyExists = Callable[[str, str | None], Awaitable[bool]]
"""Whether a key id exists (within an owner's reach, when one is given)."""

_log = logging.getLogger(__name__)


class CreditBalances:
    """GetCredits and UpdateCredits."""

    def __init__(self, store: UsageStore, authenticate: Authenticate, key_exists: KeyExists) -> None:
        self._store = store
        self._authenticate = authenticate
        self._key_exists = key_exists

    async def get(self, key_id: str, *, authorization: str) -> CreditTerms:
        """The key's credits and balance; another owner's key is not found, as in GetKey."""
        caller = await self._authenticate(authorization)
        require_scope(caller, KEYS_READ)
        canonical = _key_id(key_id)
        owner = None if caller.is_admin else caller.owner_id
        credits = await self._store.get_credits(canonical, owner_id=owner)
        if credits is None:
            if await self._key_exists(canonical, owner):
                raise NoCredits()
            raise KeyNotFound()
        return credits

    async def update(
        self, key_id: str, *, set_to: int | None, add: int | None, authorization: str
    ) -> CreditTerms:
        """Set the balance, or add to it (admin only)."""
        caller = await self._authenticate(authorization)
        require_admin(caller, "only an admin key may change credits")
        errors = Violations()
        canonical = check_key_id(key_id, errors)
        if set_to is None and add is None:
            errors.add("change", "must be set or add")
        for name, value in (("set", set_to), ("add", add)):
            if value is not None and not 0 <= value <= MAX_COUNT:
                errors.add(name, f"must be between 0 and {MAX_COUNT}")
        errors.raise_if_any()
        if canonical is None:
            raise KeyNotFound()
        try:
            credits = await self._store.update_credits(
                canonical, set_to=set_to, add=add or 0, actor=caller.key_id
            )
        except NoCredits:
            if not await self._key_exists(canonical, None):
                raise KeyNotFound() from None
            raise
        _log.info("credits changed id=%s set=%s add=%s by=%s", canonical, set_to, add, caller.key_id)
        return credits


def _key_id(key_id: str) -> str:
    errors = Violations()
    canonical = check_key_id(key_id, errors)
    errors.raise_if_any()
    if canonical is None:
        raise KeyNotFound()
    return canonical
