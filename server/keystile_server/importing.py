"""ImportKeys: moving in keys that another system issued, by the SHA-256 of their secrets.

Every system keystile replaces already holds a table of key hashes; its users cannot be asked to
reissue their keys. An admin imports them (``keystile import`` reads JSON lines or CSV), each row
checked as CreateKey checks a key, plus the hash itself; a batch reports, per row, imported or
why not (an invalid field, a hash given twice or already stored), and writes nothing for a
refused row. The imported keys verify by the secrets their users hold once their format is
registered (``--legacy-key-formats``: ``key_formats``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from .auth import Caller, require_admin
from .cache import VerificationCache
from .errors import violation_error
from .limits.rules import LimitSpec, check_limits
from .model import ImportedKey, KeyRecord, NewKey
from .store.import_store import ImportStore
from .validation import (
    Violations,
    check_hint,
    check_metadata,
    check_name,
    check_owner_id,
    check_reason,
    check_resources,
    check_scopes,
    check_secret_hash,
)

MAX_IMPORT_BATCH: Final = 1000
IMPORTED: Final = "import"
"""The creator recorded for imported keys: not the importing admin, whose cascade must not reach them."""
_PREFIX: Final = re.compile(r"\A[A-Za-z0-9_.:-]{0,32}\Z")

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImportRow:
    """One key as the request gave it, before validation."""

    secret_hash: str
    owner_id: str
    name: str
    scopes: Sequence[str] = ()
    resources: Sequence[str] = ()
    secret_hint: str = ""
    prefix: str = ""
    create_time: datetime | None = None
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    revoke_reason: str = ""
    last_used_time: datetime | None = None
    limits: Sequence[LimitSpec] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    disabled: bool = False
    rate_limit_per_minute: int = 0
    unreadable: tuple[tuple[str, str], ...] = ()
    """Fields the transport could not read (an invalid timestamp, NaN in metadata), and why."""


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    """What became of one row: its key, or why it was refused."""

    index: int
    key: KeyRecord | None = None
    error: str = ""
    fields: tuple[str, ...] = ()


def checked_row(row: ImportRow, errors: Violations) -> ImportedKey:
    """A row as the key to store; every problem goes to ``errors`` (field names as in ImportedKey)."""
    for name, why in row.unreadable:
        errors.add(name, why)
    secret_hash = check_secret_hash(row.secret_hash, errors)
    if not _PREFIX.match(row.prefix):
        errors.add("prefix", "must be at most 32 of A-Z a-z 0-9 _ . : -")
    reason = check_reason(row.revoke_reason, errors, "revoke_reason")
    if reason and row.revoke_time is None:
        errors.add("revoke_reason", "needs revoke_time")
    key = NewKey(
        id=str(uuid.uuid4()),
        owner_id=check_owner_id(row.owner_id, errors),
        name=check_name(row.name, errors),
        prefix=row.prefix,
        secret_hash=secret_hash,
        secret_hint=check_hint(row.secret_hint, errors),
        scopes=check_scopes(row.scopes, errors),
        resources=check_resources(row.resources, errors),
        metadata=check_metadata(row.metadata, errors),
        rate_limit_per_minute=row.rate_limit_per_minute,
        expire_time=row.expire_time,
        created_by=IMPORTED,
        limits=check_limits(row.limits, errors, per_minute=row.rate_limit_per_minute),
    )
    return ImportedKey(key, row.create_time, row.revoke_time, reason, row.last_used_time, row.disabled)


class KeyImporter:
    """ImportKeys: admin only, each row on its own, one transaction for the rows imported."""

    def __init__(
        self, store: ImportStore, cache: VerificationCache, authenticate: Callable[[str], Awaitable[Caller]]
    ) -> None:
        self._store = store
        self._cache = cache
        self._authenticate = authenticate

    async def import_keys(self, rows: Sequence[ImportRow], *, authorization: str) -> list[ImportOutcome]:
        """Import what is valid and new; report every row, in order."""
        caller = await self._authenticate(authorization)
        require_admin(caller, "only an admin key may import keys")
        if not rows or len(rows) > MAX_IMPORT_BATCH:
            raise violation_error("keys", f"must hold 1 to {MAX_IMPORT_BATCH} keys per request")
        outcomes: dict[int, ImportOutcome] = {}
        valid: list[tuple[int, ImportedKey]] = []
        seen: dict[bytes, int] = {}
        for index, row in enumerate(rows):
            errors = Violations()
            imported = checked_row(row, errors)
            if errors.items:
                names = tuple(v.field for v in errors.items)
                outcomes[index] = ImportOutcome(index, error=f"invalid {', '.join(names)}", fields=names)
            elif imported.key.secret_hash in seen:
                first = seen[imported.key.secret_hash]
                outcomes[index] = ImportOutcome(index, error=f"duplicate secret_hash (as row {first})")
            else:
                seen[imported.key.secret_hash] = index
                valid.append((index, imported))
        stored = await self._store.import_keys([k for _, k in valid], actor=caller.key_id) if valid else []
        for (index, _), record in zip(valid, stored, strict=True):
            if record is None:
                outcomes[index] = ImportOutcome(index, error="duplicate secret_hash (already stored)")
            else:
                self._cache.stored(record.secret_hash)
                outcomes[index] = ImportOutcome(index, key=record)
        count = sum(1 for o in outcomes.values() if o.key is not None)
        _log.info("keys imported: %d of %d by=%s", count, len(rows), caller.key_id)
        return [outcomes[i] for i in range(len(rows))]
