"""GuardedPool: every statement keystile sends is bounded in time, and an outage is answered at once.

A database that stops answering must never stall keystile's callers. Three layers bound a
statement, because each catches what the others cannot:

- **On the server**, ``statement_timeout`` (``timeout``) cancels a statement that runs too long:
  the server answers QueryCanceled, and that call alone fails (a lock wait or a heavy write is
  slow, not an outage).
- **In the kernel**, TCP keepalives and ``tcp_user_timeout`` notice a peer that vanished from
  the network, so a socket does not wait the 15 minutes TCP would otherwise give it.
- **Here**, taking a connection has ``timeout`` seconds, and a statement that has not answered
  at all ``SILENCE_GRACE`` after the server would have cancelled it is talking to a silent
  peer: its connection is *severed* (its socket shut down, which fails the statement at once
  and makes the pool discard the connection). Letting psycopg cancel the statement instead
  would send a cancel request and then wait up to ten seconds more on the same silent socket.
  The other idle connections probably share the silent path: the outage below replaces them all.

After a statement goes silent, or no connection can be had in time, the pool is in an *outage*:
every operation fails at once with ``StoreUnavailable`` instead of queueing behind a dead
network, until ``probe`` (the server's health loop) gets an answer again. During an outage the
probe does not wait for the old pool, whose reconnection attempts back off to many seconds: it
opens a fresh pool of the same configuration, and once that pool's connections answer, it
replaces the old one. A single dead connection (after a database restart, say) is not an
outage: reads retry once on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import StoreUnavailable

_log = logging.getLogger(__name__)
T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]
Query = Callable[[Connection], Awaitable[T]]

_SEVERED_WAIT: Final = 1.0
"""Seconds a statement may take to notice that its socket was shut down (it takes microseconds)."""
SILENCE_GRACE: Final = 1.0
"""Seconds past the server's statement_timeout after which a silent statement means a dead path
(half the timeout when that is shorter): the longest any statement can keep a caller waiting is
``timeout`` plus this."""
POOL_CLOSE_WAIT: Final = 1.0
"""Seconds ``close`` waits for the pool's workers, and for pools still closing in the background.

A healthy database closes in milliseconds; a hung one holds a worker in its connection attempt
for the whole connect timeout, and waiting longer (psycopg_pool's default is 5 s) only delays the
shutdown. What is left then ends with the process."""
_SECRET_PARAM: Final = re.compile(r"(password|sslpassword)\s*=\s*\S+", re.IGNORECASE)


def bounded_conninfo(conninfo: str, timeout: float) -> str:
    """``conninfo`` with keystile's time bounds added (the operator's own settings are kept).

    ``statement_timeout`` is appended to any ``options`` already given; keepalives and
    ``tcp_user_timeout`` are only set where the URL does not set them (they do nothing on Unix
    sockets, and libpq ignores them there).
    """
    params = conninfo_to_dict(conninfo)
    millis = max(1, math.ceil(timeout * 1000))
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c statement_timeout={millis}".strip()
    seconds = max(1, math.ceil(timeout))
    defaults: dict[str, Any] = {
        # libpq's own minimum is 2 seconds; below that it would take 2 anyway.
        "connect_timeout": max(2, seconds),
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": millis,
    }
    for name, value in defaults.items():
        params.setdefault(name, value)
    return make_conninfo("", **params)


def describe_database_error(exc: BaseException) -> str:
    """One log-safe line saying why the database could not be used (never a password).

    libpq's messages name the cause an operator needs (connection refused, password
    authentication failed, SSL required, no such database) on their first line.
    """
    for cause in _chain(exc):
        if isinstance(cause, PoolTimeout):
            return f"no connection within the time limit ({cause})"
        if isinstance(cause, psycopg.Error):
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            text = " ".join(lines[:2]) or type(cause).__name__
            return _SECRET_PARAM.sub(r"\1=***", text)[:300]
        if isinstance(cause, OSError | TimeoutError) and str(cause):
            return f"{type(cause).__name__}: {cause}"[:300]
    return type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def sever(conn: Connection) -> None:
    """Shut the connection's socket down under it: whatever waits on it fails at once.

    A duplicate descriptor is shut down, not the original closed, so the event loop never sees
    a descriptor vanish from under a registered reader; psycopg then fails the statement with
    an OperationalError and the pool discards the connection.
    """
    with contextlib.suppress(psycopg.Error, OSError, ValueError):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as dup:
            dup.shutdown(socket.SHUT_RDWR)


class GuardedPool:
    """A psycopg pool whose every operation has a deadline, and which fails fast during an outage."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        *,
        timeout: float,
        on_outage: Callable[[str], None] | None = None,
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self._silence_grace = min(SILENCE_GRACE, timeout / 2)
        self._on_outage = on_outage
        self.outage = ""
        """Why the database is deemed unreachable; "" while it is not."""
        self._housekeeping: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def run(self, operation: str, query: Query[T], *, retry: bool) -> T:
        """Run ``query`` on a pooled connection within ``timeout`` seconds, or raise StoreUnavailable.

        ``retry`` (reads only: they are safe to repeat) tries once more on another connection
        when the first turns out to be dead, within the same deadline.
        """
        if self.outage:
            raise StoreUnavailable()
        deadline = time.monotonic() + self.timeout
        attempts = 2 if retry else 1
        while True:
            attempts -= 1
            try:
                return await self._attempt(query, deadline)
            except _DeadConnection as dead:
                if not attempts or dead.slow or time.monotonic() >= deadline:
                    _log.warning("database unavailable in %s: %s", operation, dead.cause)
                    raise StoreUnavailable() from dead.__cause__

    async def probe(self, timeout: float) -> None:
        """``SELECT 1`` within ``timeout``, ignoring a known outage; success ends it.

        During an outage the probe runs on a fresh pool (see the module's docstring), which
        becomes the pool once it answers.
        """
        if self.outage:
            await self._reopen(timeout)
            return
        try:
            await self._attempt(_ping, time.monotonic() + timeout)
        except _DeadConnection as dead:
            raise StoreUnavailable() from dead.__cause__

    async def _reopen(self, timeout: float) -> None:
        old = self.pool
        fresh = AsyncConnectionPool(
            old.conninfo,
            min_size=old.min_size,
            max_size=old.max_size,
            timeout=old.timeout,
            open=False,
            name=old.name,
            kwargs=old.kwargs,
        )
        deadline = time.monotonic() + timeout
        swapped = False
        try:
            await fresh.open(wait=True, timeout=timeout)
            self.pool = fresh
            await self._attempt(_ping, deadline)
            swapped = True
        except (PoolTimeout, psycopg.Error, _DeadConnection) as exc:
            raise StoreUnavailable() from exc
        finally:
            if not swapped:  # failed, or cancelled (shutdown): the fresh pool must not linger
                self.pool = old
                self._background(fresh.close())
        _log.warning("database reachable again (was: %s)", self.outage)
        self.outage = ""
        self._background(old.close())

    async def close(self) -> None:
        """Close the pool (the one in use now: an outage may have replaced the first).

        Pools being closed in the background (replaced after an outage) are waited for too.
        Each wait is bounded by ``POOL_CLOSE_WAIT``: a hung database must not hold up a shutdown.
        """
        await self.pool.close(timeout=POOL_CLOSE_WAIT)
        if self._housekeeping:
            await asyncio.wait(self._housekeeping, timeout=POOL_CLOSE_WAIT)

    async def _attempt(self, query: Query[T], deadline: float) -> T:
        """One connection, one query, both before ``deadline``; failures become _DeadConnection."""
        remaining = deadline - time.monotonic()
        try:
            async with self.pool.connection(timeout=max(remaining, 0.001)) as conn:
                # The server cancels the statement after `timeout`; silence beyond that is the network.
                silent_after = time.monotonic() + self.timeout + self._silence_grace
                return await self._bounded(conn, query, silent_after)
        except _StatementTimeout as exc:
            self._enter_outage(str(exc))
            raise _DeadConnection(str(exc)) from None
        except psycopg.errors.QueryCanceled as exc:
            raise _DeadConnection(f"statement cancelled after {self.timeout:g}s", slow=True) from exc
        except PoolTimeout as exc:
            # Nothing came in time: the pool keeps failing to connect, or every connection is
            # stuck. Either way, waiting again would only make the next caller wait too.
            self._enter_outage(describe_database_error(exc))
            raise _DeadConnection(describe_database_error(exc)) from exc
        except psycopg.OperationalError as exc:
            raise _DeadConnection(describe_database_error(exc)) from exc

    async def _bounded(self, conn: Connection, query: Query[T], deadline: float) -> T:
        """``query(conn)``, severing the connection if it has not answered by ``deadline``.

        The statement runs in a task of its own so that this one decides what happens at the
        deadline (or when the caller gives up): sever first, then collect the task, so the
        connection is back in the pool only once nothing uses it.
        """
        task = asyncio.ensure_future(query(conn))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0))
        except asyncio.CancelledError:
            sever(conn)
            await _collect(task)
            raise
        if task in done:
            return task.result()
        sever(conn)
        await _collect(task)
        raise _StatementTimeout(f"statement did not answer within {self.timeout + self._silence_grace:g}s")

    def _enter_outage(self, cause: str) -> None:
        if not self.outage:
            self.outage = cause
            _log.warning("database unreachable (%s): failing fast until a probe answers", cause)
            if self._on_outage is not None:
                self._on_outage(cause)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run pool housekeeping in a task of its own, held until done; failures are ignored."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                await work

        task = asyncio.get_running_loop().create_task(run())
        self._housekeeping.add(task)
        task.add_done_callback(self._housekeeping.discard)


async def _ping(conn: Connection) -> None:
    await conn.execute("SELECT 1")


async def _collect(task: asyncio.Future[Any]) -> None:
    """Wait (briefly) for a severed statement to fail, and swallow its error.

    Only its error: a cancellation of the caller (a shutdown) goes on up. Swallowed, it left
    the health loop probing on after stop() had cancelled it, and stop() waiting for it.
    """
    try:
        with contextlib.suppress(Exception):  # the statement's own failure, or the wait's timeout
            async with asyncio.timeout(_SEVERED_WAIT):
                await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            if not task.done():
                task.cancel()
            raise
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never seen


class _StatementTimeout(Exception):
    """A statement missed its deadline and its connection was severed."""


class _DeadConnection(Exception):
    """The attempt failed; ``cause`` says why, log-safe. ``slow``: the server cancelled it.

    A cancelled statement is not retried: the database is there, and would only be slow again.
    """

    def __init__(self, cause: str, *, slow: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.slow = slow


class GuardedStore:
    """Base of the stores that share ``KeyStore``'s guarded pool and its statement counter."""

    def __init__(self, guard: GuardedPool, *, on_query: Callable[[str], None]) -> None:
        self._guard = guard
        self._on_query = on_query

    async def _run(self, operation: str, query: Query[T], *, read: bool) -> T:
        """Count and run one statement (or transaction); reads are retried once on a dead connection."""
        self._on_query(operation)
        return await self._guard.run(operation, query, retry=read)
