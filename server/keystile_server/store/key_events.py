"""KeyEventListener: one LISTEN connection per server process, turning key changes into callbacks.

Migration 0002 makes every change to ``keystile.keys`` NOTIFY ``keystile_key_events`` in the
changing transaction. This listener holds a dedicated connection (not a pooled one: a pool may
recycle it, and LISTEN is per session) and reports three things to its owner:

- ``on_connected``: LISTEN is active; every change that commits from now on will be reported.
  Anything cached before this moment may have missed events and must be dropped.
- ``on_event(secret_hash, lag)``: one key changed; ``lag`` is how long the event took to arrive.
- ``on_disconnected``: events may be lost from now on; caches must stop serving.

A bulk change (over 1000 keys in one statement) arrives as ``*`` instead of hashes: reported as
a disconnection immediately followed by a connection, which drops every cache and stream.

A broken connection is noticed at once when the server ends it (``pg_terminate_backend``, a
restart); a connection that silently stops delivering is caught by a ping every
``ping_interval`` seconds that must answer within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import psycopg

from .connections import sever

_log = logging.getLogger(__name__)

CHANNEL: Final = "keystile_key_events"
_MIN_BACKOFF: Final = 0.05
_MAX_BACKOFF: Final = 5.0
_HASH_HEX_LENGTH: Final = 64


def parse_payload(payload: str, now: float) -> tuple[bytes, float] | None:
    """The key hash and delivery lag in a notification, or None if it is not one of ours."""
    hex_hash, _, sent = payload.partition(" ")
    if len(hex_hash) != _HASH_HEX_LENGTH:
        return None
    try:
        secret_hash = bytes.fromhex(hex_hash)
        lag = max(0.0, now - float(sent)) if sent else 0.0
    except ValueError:
        return None
    return secret_hash, lag


class KeyEventListener:
    """Listens for key changes until cancelled, reconnecting with backoff."""

    def __init__(
        self,
        conninfo: str,
        *,
        on_event: Callable[[bytes, float], None],
        on_connected: Callable[[], None],
        on_disconnected: Callable[[], None],
        ping_interval: float,
        timeout: float,
    ) -> None:
        self._conninfo = conninfo
        self._on_event = on_event
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._ping_interval = ping_interval
        self._timeout = timeout
        self._connected = False
        self._established = False

    async def run(self) -> None:
        """Listen, report, and reconnect after any failure; returns only by cancellation."""
        delay = _MIN_BACKOFF
        while True:
            self._established = False
            try:
                await self._listen()
            except asyncio.CancelledError:
                self._connected = False  # shutting down: nothing left to protect
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                _log.warning("key event listener lost (%s); reconnecting", type(exc).__name__)
            except Exception:
                # A bug must not leave the cache armed with nobody listening: fail closed, retry.
                _log.exception("key event listener failed; reconnecting")
            if self._established:
                delay = _MIN_BACKOFF  # it worked until now: try again soon
            self._report_lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self._timeout)),
            application_name="keystile-listener",
        )
        async with conn:
            async with asyncio.timeout(self._timeout):  # not wait_for: it can swallow a cancel
                await conn.execute(f"LISTEN {CHANNEL}")
            self._connected = self._established = True
            self._on_connected()
            _log.info("key event listener connected")
            while True:
                # notifies() returns after ping_interval however busy the channel is, so the
                # ping below runs on schedule even under a steady stream of events.
                async for notify in conn.notifies(timeout=self._ping_interval):
                    self._dispatch(notify.payload)
                await self._ping(conn)

    async def _ping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Round-trip on the LISTEN connection; a silent network fails it after ``timeout``.

        The loss is reported before anything else, and the connection is severed rather than
        the query cancelled: cancelling on a dead network waits seconds more on the same silent
        socket, and the cache must stop serving now, not after the cleanup.
        """
        ping = asyncio.ensure_future(conn.execute("SELECT 1"))
        try:
            done, _ = await asyncio.wait({ping}, timeout=self._timeout)
        except asyncio.CancelledError:
            # Shutting down: the ping holds the connection's lock, and leaving the connection
            # waits for that lock; on a hung network, for ever (a stop() never returned).
            sever(conn)
            ping.add_done_callback(lambda task: task.cancelled() or task.exception())
            raise
        if ping in done:
            ping.result()
            return
        self._report_lost()
        sever(conn)  # the ping fails at once, and closing the connection does not wait
        ping.add_done_callback(lambda task: task.cancelled() or task.exception())
        raise TimeoutError("key event listener did not answer its ping")

    def _report_lost(self) -> None:
        if self._connected:
            self._connected = False
            self._on_disconnected()

    def _dispatch(self, payload: str) -> None:
        parsed = parse_payload(payload, time.time())
        if parsed is None:
            if payload.startswith("* "):
                _log.info("bulk key change: dropping cached state")
            else:  # not a payload we wrote: we cannot tell which key changed, so treat it as a gap
                _log.warning("unreadable key event %r: dropping cached state", payload[:80])
            self._on_disconnected()
            self._on_connected()
            return
        self._on_event(*parsed)
