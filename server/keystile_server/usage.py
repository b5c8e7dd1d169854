"""last_used_time bookkeeping, kept off the VerifyKey request path.

A verification only notes the key id in memory; a background task writes every noted key in one
statement per flush interval. A key already written within the last minute is not noted again,
and the store's statement re-checks that minute in SQL so that several server processes together
still write each key at most once a minute. Usage is best-effort: a failed flush is logged and
dropped rather than retried, since it must never slow or fail a verification.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Final

from .errors import StoreUnavailable
from .store import KeyStore

_log = logging.getLogger(__name__)
MIN_WRITE_INTERVAL: Final = 60.0
"""Seconds: a key is written at most this often."""


class UsageRecorder:
    """Collects key uses in memory and flushes them to the store in batches."""

    def __init__(self, store: KeyStore, *, flush_interval: float) -> None:
        self._store = store
        self._flush_interval = flush_interval
        # POSIX timestamps, not datetimes: record() runs on every verification, and building a
        # timezone-aware datetime there was one of the larger costs of a cache hit.
        self._pending: dict[str, float] = {}
        self._written: dict[str, float] = {}

    def record(self, key_id: str, when: float) -> None:
        """Note that ``key_id`` was used at ``when`` (POSIX seconds); a dict lookup, never I/O."""
        last = self._written.get(key_id)
        if last is not None and when - last < MIN_WRITE_INTERVAL:
            return
        self._pending.setdefault(key_id, when)

    async def flush(self) -> None:
        """Write everything pending in one statement."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_usage(
                {key_id: datetime.fromtimestamp(when, UTC) for key_id, when in batch.items()},
                min_interval_seconds=MIN_WRITE_INTERVAL,
            )
        except StoreUnavailable:
            _log.warning("dropped last_used_time for %d keys: database unavailable", len(batch))
            return
        newest = max(batch.values())
        # Forget keys written over a minute ago so the map stays as small as the active key set.
        self._written = {k: t for k, t in self._written.items() if newest - t < MIN_WRITE_INTERVAL}
        self._written.update(batch)

    async def run(self) -> None:
        """Flush every interval until cancelled; the owner flushes once more at shutdown."""
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                _log.exception("last_used_time flush failed")
