"""KeyEventHub: fans key-change events out to WatchKeyEvents subscribers.

A subscriber's guarantee is all or nothing: while its stream is open, it receives every change
that committed after its READY. So the hub closes every stream the moment the process's listener
loses its connection (events may have been missed), refuses new subscribers until the listener
is back, and closes a subscriber that falls too far behind instead of dropping its events. Each
closed stream ends with UNAVAILABLE; the client drops its cache and resubscribes.
"""

from __future__ import annotations

import asyncio
from typing import Final

from .errors import EventsUnavailable

MAX_PENDING: Final = 10_000
MAX_BATCH: Final = 512


class Subscription:
    """One subscriber's queue of changed key hashes."""

    def __init__(self, hub: KeyEventHub) -> None:
        self._hub = hub
        self._pending: list[bytes] = []
        self._wakeup = asyncio.Event()
        self.closed_because = ""

    def _push(self, secret_hash: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._close("subscriber too slow")
            return
        self._pending.append(secret_hash)
        self._wakeup.set()

    def _close(self, why: str) -> None:
        if not self.closed_because:
            self.closed_because = why
            self._wakeup.set()
            self._hub._subscribers.discard(self)

    async def next_batch(self, timeout: float) -> list[bytes]:
        """Changed hashes (oldest first), or [] when ``timeout`` passes with none: time to heartbeat."""
        if not self._pending and not self.closed_because:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                    await self._wakeup.wait()
            except TimeoutError:
                return []
        if self.closed_because:
            raise EventsUnavailable(self.closed_because)
        self._wakeup.clear()
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if self._pending:
            self._wakeup.set()
        return batch

    def close(self) -> None:
        """Unsubscribe (the stream ended)."""
        self._close("unsubscribed")


class KeyEventHub:
    """Every open subscription of this process, fed by the process's KeyEventListener."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._open = False

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """A new subscription, or EventsUnavailable while events are not flowing."""
        if not self._open:
            raise EventsUnavailable("listener not connected")
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, secret_hash: bytes) -> None:
        """Queue one changed key for every subscriber."""
        for subscription in list(self._subscribers):
            subscription._push(secret_hash)

    def open(self) -> None:
        """Events are flowing: accept subscribers."""
        self._open = True

    def close_all(self, why: str) -> None:
        """End every stream (and refuse new ones) because events may be lost or we are stopping."""
        self._open = False
        for subscription in list(self._subscribers):
            subscription._close(why)
