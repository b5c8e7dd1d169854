"""DatabaseHealth: what the gRPC health service says about the database, and when it changes.

A server is SERVING only while its database answers. A background loop probes it every
``--health-check-interval``, each probe bounded by that interval (or ``--db-timeout``, if
shorter), so a database that stops answering turns health NOT_SERVING within two intervals.
Sooner, usually: when a statement times out or no connection can be had (an *outage*, see
``store.connections``), the store says so and health turns NOT_SERVING at once. While the
database is down, probes run every ``DOWN_PROBE_INTERVAL`` seconds; the first that answers ends
the outage, and SERVING returns with it.

The same loop runs the process's housekeeping (gauges, the open-file watch), handed in by the
server, since it wakes every interval anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from .errors import StoreUnavailable
from .store import KeyStore
from .store.connections import describe_database_error

_log = logging.getLogger(__name__)

DOWN_PROBE_INTERVAL: Final = 0.5
"""Seconds between probes while the database is unreachable: how soon service resumes after."""


class DatabaseHealth:
    """Probes the database and reports SERVING or NOT_SERVING through ``set_serving``."""

    def __init__(
        self,
        store: KeyStore,
        *,
        interval: float,
        db_timeout: float,
        set_serving: Callable[[bool], Awaitable[None]],
        housekeeping: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._probe_timeout = min(db_timeout, interval)
        self._set_serving = set_serving
        self._housekeeping = housekeeping
        self._serving = True
        self._wake = asyncio.Event()
        self._reports: set[asyncio.Task[None]] = set()

    def outage(self, cause: str) -> None:
        """The store found the database unreachable: NOT_SERVING now, then probe often."""
        if self._serving:
            report = asyncio.get_running_loop().create_task(self._report(False))
            self._reports.add(report)
            report.add_done_callback(self._reports.discard)
        self._wake.set()

    async def _report(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            await self._set_serving(serving)
            _log.warning("database %s", "reachable again: SERVING" if serving else "unreachable: NOT_SERVING")

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            interval = self._interval if self._serving else min(self._interval, DOWN_PROBE_INTERVAL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # not wait_for: it can swallow a cancel
                    await self._wake.wait()
            self._wake.clear()
            self._housekeeping()
            try:
                await self._store.ping(self._probe_timeout)
                healthy = True
            except StoreUnavailable as exc:
                healthy = False
                _log.debug("health probe failed: %s", describe_database_error(exc))
            await self._report(healthy)
