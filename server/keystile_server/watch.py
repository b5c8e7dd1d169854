"""KeyEventHub: fans key-change events out to WatchKeyEvents subscribers, within fixed bounds.

A subscriber's guarantee is all or nothing: while its stream is open, it receives every change
that committed after its READY. So the hub ends every stream the moment the process's listener
loses its connection (events may have been missed), refuses new subscribers until the listener
is back, and ends a subscriber that falls behind instead of dropping its events. Each ended
stream gets UNAVAILABLE; the client drops its cache and resubscribes.

What keeps thousands of subscribers (or an attacker's never-reading streams) from stalling the
process:

- **A cap**: at most ``max_subscribers`` streams per process; beyond it, RESOURCE_EXHAUSTED.
- **Serialized once**: the changes of one loop turn become one INVALIDATE message, serialized
  once and shared by every subscriber's queue (a queue holds references, not copies).
- **Bounded queues**: a subscriber more than ``MAX_QUEUED`` messages behind, or whose stream has
  not taken a message for ``stall_timeout`` seconds, is ended at once, even while its handler is
  blocked writing to a client that stopped reading; its queue is freed with it.
- **Fan-out in slices**: a message is handed to ``FANOUT_SLICE`` subscribers per loop turn, so
  requests that arrive meanwhile (VerifyKey) are served between slices, not after all of them.
- **Credentials**: a stream opened with a caller key (``--verify-auth required``) ends when that
  key changes (it resubscribes, and is authenticated again) or expires.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from keystile.v1 import keys_pb2

from .errors import EventsUnavailable, KeystileError, TooManyWatchers, Unauthenticated

MAX_QUEUED: Final = 256
"""Messages a subscriber may be behind before it is ended (each holds up to MAX_BATCH hashes)."""
MAX_BATCH: Final = 512
FANOUT_SLICE: Final = 64
WRITE_GRACE: Final = 0.5
"""Seconds an ended stream's pending write gets to complete before it is interrupted."""

Clock = Callable[[], float]


def invalidate_message(hashes: list[bytes]) -> bytes:
    """A serialized INVALIDATE naming ``hashes``."""
    return keys_pb2.WatchKeyEventsResponse(
        type=keys_pb2.KEY_EVENT_TYPE_INVALIDATE, key_hashes=hashes
    ).SerializeToString()


HEARTBEAT: Final = keys_pb2.WatchKeyEventsResponse(type=keys_pb2.KEY_EVENT_TYPE_HEARTBEAT).SerializeToString()


class Subscription:
    """One subscriber: a queue of shared serialized messages, and why it ended (once it has)."""

    def __init__(self, hub: KeyEventHub, *, credential: bytes, credential_expires: float | None) -> None:
        self._hub = hub
        self._queue: deque[bytes] = deque()
        self._wakeup = asyncio.Event()
        self.credential = credential
        self._credential_expires = credential_expires
        self.ended: KeystileError | None = None
        self._writer: asyncio.Task[object] | None = None
        self._writing_since = 0.0

    def _deliver(self, message: bytes, now: float) -> None:
        if self.ended is not None:
            return
        if len(self._queue) >= MAX_QUEUED:
            self._end(EventsUnavailable("subscriber too slow"))
        elif self._writer is not None and now - self._writing_since > self._hub.stall_timeout:
            self._end(EventsUnavailable("subscriber stopped reading"))
        else:
            self._queue.append(message)
            self._wakeup.set()

    def _end(self, why: KeystileError) -> None:
        """End the stream: wake its handler, or interrupt the write it is blocked in."""
        if self.ended is None:
            self.ended = why
            self._queue.clear()
            self._hub._forget(self)
            self._wakeup.set()
            if self._writer is not None:
                # A write that is merely finishing completes in microseconds, and interrupting
                # gRPC mid-write can leave the call unable to send its status: only a write
                # still blocked after WRITE_GRACE (a client that stopped reading) is cut short.
                asyncio.get_running_loop().call_later(WRITE_GRACE, self._interrupt_write)

    def _interrupt_write(self) -> None:
        if self._writer is not None:
            self._writer.cancel()

    async def next_message(self, heartbeat_interval: float) -> bytes:
        """The next message to send: queued events, else a heartbeat when the interval passes.

        Raises the reason the stream ended (UNAVAILABLE for lost events or a slow reader,
        UNAUTHENTICATED once the caller's key has expired).
        """
        if not self._queue and self.ended is None:
            timeout = heartbeat_interval
            if self._credential_expires is not None:
                timeout = min(timeout, max(0.0, self._credential_expires - time.time()))
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                    await self._wakeup.wait()
            except TimeoutError:
                pass
        if (
            self.ended is None
            and self._credential_expires is not None
            and time.time() >= self._credential_expires
        ):
            self._end(Unauthenticated("CREDENTIALS_EXPIRED"))
        if self.ended is not None:
            raise self.ended
        self._wakeup.clear()
        if self._queue:
            message = self._queue.popleft()
            if self._queue:
                self._wakeup.set()
            return message
        return HEARTBEAT

    async def write(self, send: Callable[[bytes], Awaitable[None]], message: bytes) -> None:
        """``await send(message)``, interrupted (raising why) if the hub ends the stream meanwhile.

        A client that stops reading blocks the write once gRPC's flow-control window is full;
        the hub then cancels this task (after ``WRITE_GRACE``), and the cancellation is turned
        back into the reason.
        """
        task = asyncio.current_task()
        assert task is not None
        self._writer, self._writing_since = task, self._hub.clock()
        try:
            await send(message)
        except asyncio.CancelledError:
            if self.ended is None:
                raise  # not ours: shutdown, or the client went away
            task.uncancel()
            raise self.ended from None
        finally:
            self._writer = None

    def close(self) -> None:
        """Unsubscribe (the stream ended on its own)."""
        self._end(EventsUnavailable("unsubscribed"))


class KeyEventHub:
    """Every open subscription of this process, fed by the process's KeyEventListener."""

    def __init__(
        self, *, max_subscribers: int = 1000, stall_timeout: float = 30.0, clock: Clock = time.monotonic
    ) -> None:
        self.max_subscribers = max_subscribers
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._subscribers: set[Subscription] = set()
        self._by_credential: dict[bytes, set[Subscription]] = {}
        self._open = False
        self._changed: list[bytes] = []
        self._flush_scheduled = False
        self._fanouts: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, *, credential: bytes = b"", credential_expires: float | None = None) -> Subscription:
        """A new subscription; EventsUnavailable while events are not flowing, TooManyWatchers at the cap.

        ``credential`` is the hash of the caller's key (when it presented one): a change to that
        key ends the stream, and so does ``credential_expires`` (POSIX seconds) passing.
        """
        if not self._open:
            raise EventsUnavailable("listener not connected")
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManyWatchers(self.max_subscribers)
        subscription = Subscription(self, credential=credential, credential_expires=credential_expires)
        self._subscribers.add(subscription)
        if credential:
            self._by_credential.setdefault(credential, set()).add(subscription)
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        holders = self._by_credential.get(subscription.credential)
        if holders is not None:
            holders.discard(subscription)
            if not holders:
                del self._by_credential[subscription.credential]

    def publish(self, secret_hash: bytes) -> None:
        """Queue one changed key; every change of this loop turn leaves in one message."""
        for subscription in list(self._by_credential.get(secret_hash, ())):
            subscription._end(EventsUnavailable("the caller's key changed; resubscribe"))
        if not self._subscribers:
            return
        self._changed.append(secret_hash)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        changed, self._changed = self._changed, []
        messages = [invalidate_message(changed[i : i + MAX_BATCH]) for i in range(0, len(changed), MAX_BATCH)]
        if not messages or not self._subscribers:
            return
        fanout = asyncio.get_running_loop().create_task(self._fan_out(messages, list(self._subscribers)))
        self._fanouts.add(fanout)
        fanout.add_done_callback(self._fanouts.discard)

    async def _fan_out(self, messages: list[bytes], subscribers: list[Subscription]) -> None:
        """Hand ``messages`` to every subscriber, a slice per loop turn."""
        for start in range(0, len(subscribers), FANOUT_SLICE):
            if start:
                await asyncio.sleep(0)
            now = self.clock()
            for subscription in subscribers[start : start + FANOUT_SLICE]:
                for message in messages:
                    subscription._deliver(message, now)

    def open(self) -> None:
        """Events are flowing: accept subscribers."""
        self._open = True

    def close_all(self, why: str) -> None:
        """End every stream (and refuse new ones) because events may be lost or we are stopping."""
        self._open = False
        for subscription in list(self._subscribers):
            subscription._end(EventsUnavailable(why))
