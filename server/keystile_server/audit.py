"""The audit trail: what each management action changed, and who may read it.

Every management action (create, update, roll, disable, enable, revoke, delete, import, policy and
credit changes) is recorded by the store in the same transaction as the change, as an
``AuditEntry`` (action, actor, key, owner) with the fields it changed and their old and new values
(``key_changes``). Values are JSON: times as RFC 3339 text, limits and credits as objects. A
secret never reaches this module, and a hash is never recorded: ``AUDITED_FIELDS`` lists what is.

``AuditLog`` answers ListAuditEvents (admins see everything; ``keys:read`` callers their own
owner's events) and purges events past the retention setting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from .auth import KEYS_READ, Caller, require_owner, require_scope
from .model import KeyRecord
from .page_tokens import PageTokenCodec
from .validation import Violations, check_actor, check_key_id, check_owner_id, check_page_size

AUDITED_FIELDS: Final = (
    "owner_id",
    "name",
    "prefix",
    "secret_hint",
    "scopes",
    "resources",
    "metadata",
    "rate_limit_per_minute",
    "expire_time",
    "revoke_time",
    "revoke_reason",
    "disable_time",
    "limits",
    "credits",
    "replaces",
    "replaced_by",
    "create_time",
    "last_used_time",
    "created_by",
)
"""The key fields an event may show. Never ``secret_hash``: a hash identifies a secret."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One action to record: who did what to which key or owner, and what changed."""

    action: str
    actor: str
    owner_id: str | None = None
    key_id: str | None = None
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A recorded action, as ListAuditEvents returns it."""

    id: int
    event_time: datetime
    action: str
    actor: str
    key_id: str | None
    owner_id: str | None
    changes: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What ListAuditEvents selects: every field set must match."""

    owner_id: str = ""
    key_id: str = ""
    actor: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


def json_value(value: Any) -> Any:
    """A field's value as JSON: times as RFC 3339 text, dataclasses (limits, credits) as objects."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return json_value(asdict(value))
    if hasattr(value, "value"):  # an enum
        return json_value(value.value)
    return str(value)


def key_changes(before: KeyRecord | None, after: KeyRecord | None) -> dict[str, dict[str, Any]]:
    """The audited fields that differ between two snapshots of a key (None: it did not exist)."""
    changes: dict[str, dict[str, Any]] = {}
    for name in AUDITED_FIELDS:
        old = json_value(getattr(before, name)) if before is not None else None
        new = json_value(getattr(after, name)) if after is not None else None
        if old != new:
            changes[name] = {"old": old, "new": new}
    return changes


def key_entry(action: str, actor: str, before: KeyRecord | None, after: KeyRecord | None) -> AuditEntry:
    """The entry for an action on one key, with what it changed."""
    record = after if after is not None else before
    assert record is not None
    return AuditEntry(action, actor, record.owner_id, record.id, key_changes(before, after))


ListEvents = Callable[[AuditFilter, int | None, int], Awaitable[list[AuditEvent]]]
PurgeEvents = Callable[[datetime], Awaitable[int]]


class AuditLog:
    """ListAuditEvents, and the retention of events."""

    def __init__(
        self,
        list_events: ListEvents,
        purge: PurgeEvents,
        authenticate: Callable[[str], Awaitable[Caller]],
        page_tokens: PageTokenCodec,
    ) -> None:
        self._list = list_events
        self._purge = purge
        self._authenticate = authenticate
        self._tokens = page_tokens

    async def list(
        self, selected: AuditFilter, *, page_size: int, page_token: str, authorization: str
    ) -> tuple[list[AuditEvent], str]:
        """One page of events, newest first, and the token for the next page ("" when done).

        A non-admin (``keys:read``) sees only its own owner's events: naming another owner is
        PERMISSION_DENIED, and no owner means its own. A page token is bound to the filters it
        was issued for.
        """
        caller = await self._authenticate(authorization)
        require_scope(caller, KEYS_READ)
        errors = Violations()
        if selected.owner_id:
            check_owner_id(selected.owner_id, errors)
        key_id = check_key_id(selected.key_id, errors, "key_id") if selected.key_id else ""
        actor = check_actor(selected.actor, errors, "actor_key_id") if selected.actor else ""
        if selected.start_time and selected.end_time and selected.start_time >= selected.end_time:
            errors.add("end_time", "must be after start_time")
        limit = check_page_size(page_size, errors)
        errors.raise_if_any()
        if key_id is None:  # no key has such an id, so none has events
            return [], ""
        scope = _token_scope(selected)
        before_id = self._tokens.decode_id(page_token, scope) if page_token else None
        owner = selected.owner_id
        if not caller.is_admin:
            if owner:
                require_owner(caller, owner)
            owner = caller.owner_id
        selected = AuditFilter(owner, key_id, actor, selected.start_time, selected.end_time)
        events = await self._list(selected, before_id, limit)
        token = self._tokens.encode_id(events[-1].id, scope) if len(events) == limit else ""
        return events, token

    async def purge(self, retention: timedelta, now: datetime) -> int:
        """Delete events older than ``retention``; how many went."""
        purged = await self._purge(now - retention)
        if purged:
            _log.info("audit retention: %d events older than %s deleted", purged, retention)
        return purged


def _token_scope(selected: AuditFilter) -> str:
    """What an audit page token is bound to: the filters as requested."""
    times = [t.isoformat() if t else "" for t in (selected.start_time, selected.end_time)]
    return "|".join(["audit", selected.owner_id, selected.key_id, selected.actor, *times])
