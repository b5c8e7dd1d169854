"""Who is calling, and what their key lets them do to keys.

keystile dogfoods itself: management callers present a keystile key as ``authorization: Bearer
<key>``, verified by the same lookup as VerifyKey. ``Caller`` is the authenticated identity; the
functions here are the permission rules (scopes, tenancy, no escalation), kept apart from the
mechanics of the service so that each rule reads on its own and is tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from .errors import FieldViolation, PermissionDenied
from .limits.rules import weaker_limits
from .model import CreditTerms, RateLimit
from .validation import ADMIN_SCOPE, scope_covers

KEYS_READ: Final = "keys:read"
KEYS_WRITE: Final = "keys:write"
KEYS_VERIFY: Final = "keys:verify"
STATIC_ADMIN_ID: Final = "static-admin"
"""The caller id recorded for the static KEYSTILE_ADMIN_KEY (it has no key row)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: its key's id and grants, never its secret."""

    key_id: str
    owner_id: str
    scopes: tuple[str, ...]
    resources: tuple[str, ...] = ()
    expire_time: datetime | None = None
    key_hash: bytes = field(default=b"", repr=False)
    """The SHA-256 of the caller's key (empty for the static admin key): what its events name."""
    limits: tuple[RateLimit, ...] = ()
    credits: CreditTerms | None = None

    @property
    def is_admin(self) -> bool:
        """``admin`` acts on every owner's keys with every permission."""
        return ADMIN_SCOPE in self.scopes

    def owns(self, owner_id: str) -> bool:
        """Whether this caller may act on keys of ``owner_id``.

        Even its own owner's keys that grant ``admin`` are out of a non-admin's reach: every read
        and revocation made for a tenant leaves them out (``_TENANT_REACH`` in the store).
        """
        return self.is_admin or owner_id == self.owner_id


def require_scope(caller: Caller, scope: str) -> None:
    """PERMISSION_DENIED unless the caller's key grants ``scope``."""
    if not scope_covers(caller.scopes, scope):
        raise PermissionDenied(f"the caller's key lacks the {scope!r} scope", "SCOPE_REQUIRED")


def require_admin(caller: Caller, message: str) -> None:
    """PERMISSION_DENIED (ADMIN_REQUIRED) unless the caller's key grants ``admin``."""
    if not caller.is_admin:
        raise PermissionDenied(message, "ADMIN_REQUIRED")


def require_owner(caller: Caller, owner_id: str) -> None:
    """PERMISSION_DENIED when a non-admin names another owner (used where ids are not secret-ish)."""
    if not caller.owns(owner_id):
        raise PermissionDenied(
            "a non-admin key may only act on its own owner's keys",
            "OWNER_MISMATCH",
            [FieldViolation("owner_id", "must be the caller's own owner_id")],
        )


def check_no_escalation(
    caller: Caller,
    *,
    owner_id: str,
    scopes: Sequence[str],
    resources: Sequence[str],
    expire_time: datetime | None,
    expiry_field: str,
    limits: Sequence[RateLimit] = (),
    credits: CreditTerms | None = None,
) -> None:
    """A non-admin may only mint keys weaker than its own: scopes, resources, lifetime, limits."""
    if caller.is_admin:
        return
    denied: list[FieldViolation] = []
    if owner_id != caller.owner_id:
        denied.append(FieldViolation("owner_id", "must be the caller's own owner_id"))
    for index, scope in enumerate(scopes):
        if not scope_covers(caller.scopes, scope):
            denied.append(FieldViolation(f"scopes[{index}]", f"the caller's key does not grant {scope!r}"))
    if caller.resources:
        if not resources:
            denied.append(FieldViolation("resources", "must be restricted to the caller's own resources"))
        for index, resource in enumerate(resources):
            if resource not in caller.resources:
                denied.append(FieldViolation(f"resources[{index}]", "is outside the caller's own resources"))
    if caller.expire_time is not None and (expire_time is None or expire_time > caller.expire_time):
        denied.append(FieldViolation(expiry_field, "must expire no later than the caller's own key"))
    denied += weaker_limits(caller.limits, caller.credits, limits, credits)
    if denied:
        fields = ", ".join(v.field for v in denied)
        raise PermissionDenied(f"the new key would exceed the caller's own: {fields}", "ESCALATION", denied)
