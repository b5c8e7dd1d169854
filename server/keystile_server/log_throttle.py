"""LogThrottle: log lines that a client (or an outage) can cause, at most once per interval.

A bad request, an unavailable database or a refused stream happens once per call, and calls are
what an attacker (or a retry storm) has plenty of. Logging each one would let a client turn two
bytes of request into hundreds of bytes of server log. A throttled line is written the first
time, then at most once per ``interval`` seconds per kind, saying how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

DEFAULT_INTERVAL: Final = 10.0
_MAX_KINDS: Final = 256
"""Kinds remembered at once; a client inventing new kinds cannot grow this without bound."""


class LogThrottle:
    """At most one line per kind per interval; the next line says how many were suppressed."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(
        self, level: int, kind: str, message: str, *args: object, exc_info: BaseException | None = None
    ) -> bool:
        """Log ``message % args`` unless ``kind`` was logged less than an interval ago.

        Returns whether the line was written. ``kind`` should be a small fixed vocabulary
        (an RPC name and a reason), never text from the request.
        """
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if len(self._next) >= _MAX_KINDS and kind not in self._next:
            self._next.clear()
        self._next[kind] = now + self._interval
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self._interval:g}s)"
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True
