"""VerificationCache: key hash to an immutable snapshot of the key, in front of every lookup.

Why each part exists:

- **Positive entries** (``CachedKey``) hold the ``KeyRecord`` a verdict is judged from (expiry is
  judged per call from the snapshot, so an entry never outlives its key's ``expire_time``). Revoked
  keys are cached too: revocation is final. Verdicts the service derives from a snapshot are kept
  on its entry, so they leave the cache with it and need no bookkeeping of their own.
- **The key filter** (``key_filter.py``) answers hashes that certainly match no key without a
  query, so a flood of distinct unknown keys costs no database work.
- **Negative entries** remember well-formed hashes that matched no key, in a separate, smaller
  bound, so that a client hammering one bad key costs the database nothing. A key created later
  evicts its negative entry through the same event as a revocation.
- **Single flight, coalesced**: concurrent misses for one hash share one load, and misses for
  different hashes that arrive together share one ``= ANY(...)`` query.
- **Bounded waiting**: at most ``max_pending`` distinct hashes wait for the database at once;
  beyond that a miss is refused at once (``LookupsOverloaded``, UNAVAILABLE) instead of queued.
  A load that stalls does not hold up the queue behind it (see ``STALLED_LOAD``).
- **Push invalidation**: ``invalidate`` is called for every key-change event (and locally after a
  revocation). Each invalidation bumps an epoch; a load that started under an older epoch still
  answers its waiters but does not store its result, so a fill racing a revocation can never
  resurrect the revoked key. Loads in flight are detached, so later callers start afresh.
- **Armed only while events flow**: ``arm`` (listener connected) clears everything and starts
  caching; ``disarm`` (listener lost) clears everything and bypasses the cache until re-armed.
  ``hold`` is the opt-in alternative to ``disarm`` (``--on-database-outage serve-cached``): the
  entries already cached keep being served until their staleness deadline, and nothing new is
  stored, since no event could fence it.
- **max_staleness**: whatever else fails, no entry is served older than this many seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from .errors import LookupsOverloaded
from .key_filter import KeyFilter
from .metrics import ServerMetrics
from .model import KeyRecord

_log = logging.getLogger(__name__)

Loader = Callable[[Sequence[bytes]], Awaitable[dict[bytes, KeyRecord]]]
MAX_BATCH: Final = 256
# One load at a time while loads answer promptly: misses that arrive while it is in flight queue
# up and leave together as one batch, which is how a miss storm turns into a handful of queries.
# Measured: two loads in flight at 16 calls halved the batch size and cost ~40 % more server CPU
# per miss. But a load that has not answered within STALLED_LOAD seconds (a lookup takes about a
# millisecond) may be stuck on a dead connection, so the next batch leaves beside it rather than
# waiting for its timeout: one stuck fill never holds up the others.
MAX_CONCURRENT_LOADS: Final = 4
STALLED_LOAD: Final = 0.05


class CachedKey:
    """One cached snapshot of a key, fresh until ``fresh_until`` (the cache's clock).

    ``verdicts`` is the owner's: the service memoizes the verdicts it judged from ``record``
    there. The entry is replaced on every reload and dropped on every event, eviction or
    expiry, and whatever hangs on it goes with it: a derived verdict cannot outlive its snapshot.
    """

    __slots__ = ("fresh_until", "record", "verdicts")

    def __init__(self, record: KeyRecord | None, fresh_until: float) -> None:
        self.record = record
        self.fresh_until = fresh_until
        self.verdicts: dict[object, Any] = {}


UNKNOWN_KEY: Final = CachedKey(None, math.inf)
"""What ``peek`` answers for a remembered unknown hash (the negative cache keeps only deadlines)."""


def _consume(future: asyncio.Future[KeyRecord | None]) -> None:
    """Mark an exception as seen when every waiter has gone (a cancelled caller)."""
    if not future.cancelled():
        future.exception()


class VerificationCache:
    """Per-process cache of key snapshots, with coalesced loading and epoch-fenced fills."""

    def __init__(
        self,
        load: Loader,
        *,
        max_entries: int,
        negative_max_entries: int,
        max_staleness: float,
        metrics: ServerMetrics,
        max_pending: int = 1000,
        key_filter: KeyFilter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._filter = key_filter
        self._max_pending = max_pending
        self._max_entries = max_entries
        self._negative_max_entries = negative_max_entries
        self._max_staleness = max_staleness
        self._metrics = metrics
        self._clock = clock
        self._positive: OrderedDict[bytes, CachedKey] = OrderedDict()
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[KeyRecord | None]] = {}
        self._queue: list[tuple[bytes, asyncio.Future[KeyRecord | None]]] = []
        self._loads_started: list[float] = []  # start time of each load in flight (its clock)
        # The loop keeps only weak references to tasks: a fill nobody held could vanish mid-query
        # and leave _loads_running stuck, stalling every later miss.
        self._fills: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled = False
        self._epoch = 0
        self.armed = False
        """Entries are stored and served: events are flowing."""
        self._serving = False  # entries are served: armed, or holding through an outage
        self._outcome = metrics.cache_lookups
        self._hits = metrics.cache_lookups["hit"]
        self._evicted = metrics.cache_evictions

    def __len__(self) -> int:
        return len(self._positive) + len(self._negative)

    def peek(self, secret_hash: bytes) -> CachedKey | None:
        """The fresh entry for this hash (``UNKNOWN_KEY`` for a known-unknown hash), else None.

        Synchronous and query-free: the verification path tries this before anything else.
        """
        if not self._serving:
            return None
        now = self._clock()
        entry = self._positive.get(secret_hash)
        if entry is not None:
            if entry.fresh_until > now:
                self._positive.move_to_end(secret_hash)
                self._hits.value += 1  # HotCounter.inc, inlined: every hit passes here
                return entry
            del self._positive[secret_hash]
            self._evicted["expired"].inc()
            return None
        deadline = self._negative.get(secret_hash)
        if deadline is not None:
            if deadline > now:
                self._outcome["negative_hit"].inc()
                return UNKNOWN_KEY
            del self._negative[secret_hash]
            self._evicted["expired"].inc()
        return None

    async def load(self, secret_hash: bytes) -> KeyRecord | None:
        """Fetch from the database (joining a load in flight), caching the answer when allowed.

        A hash the key filter has certainly never seen is answered None without a query (the
        filter is trusted only while events flow, as the cache is).
        """
        if self.certainly_unknown(secret_hash):
            return None
        self._outcome["miss" if self.armed else "bypass"].inc()
        return await self._fetch(secret_hash)

    def certainly_unknown(self, secret_hash: bytes) -> bool:
        """Whether the key filter says no key has this hash; only while events flow (armed)."""
        key_filter = self._filter
        if self.armed and key_filter is not None and not key_filter.might_contain(secret_hash):
            self._outcome["filtered"].inc()
            return True
        return False

    async def get(self, secret_hash: bytes) -> KeyRecord | None:
        """The key with this hash (None: no such key), from memory when a fresh entry exists."""
        entry = self.peek(secret_hash)
        if entry is not None:
            return entry.record
        return await self.load(secret_hash)

    def stored(self, secret_hash: bytes) -> None:
        """A key was just stored by this process: never answer it from the filter or a negative entry.

        Its creation event will say the same within milliseconds, but the creating caller may
        verify the key before the event arrives.
        """
        if self._filter is not None:
            self._filter.add(secret_hash)
        self.invalidate(secret_hash)

    def invalidate(self, secret_hash: bytes) -> None:
        """Forget one key now, and fence every load in flight (it may have read the old row)."""
        self._epoch += 1
        self._inflight.pop(secret_hash, None)
        if self._positive.pop(secret_hash, None) is not None or secret_hash in self._negative:
            self._negative.pop(secret_hash, None)
            self._evicted["invalidated"].inc()

    def arm(self) -> None:
        """Start caching from empty: events are flowing, so every later change will be seen."""
        self._clear()
        self.armed = self._serving = True
        self._metrics.listener_up.set(1)

    def disarm(self) -> None:
        """Stop serving from memory and drop everything: changes may now go unseen."""
        self.armed = self._serving = False
        self._clear()
        self._metrics.listener_up.set(0)

    def hold(self) -> None:
        """Keep serving what is cached, until each entry's staleness deadline; store nothing new.

        For ``--on-database-outage serve-cached``: changes may go unseen now, so an entry may
        be served after its key was revoked, but never longer than ``max_staleness`` after it
        was loaded. ``arm`` (events flowing again) starts afresh from empty.
        """
        self.armed = False
        self._serving = True
        self._epoch += 1  # loads in flight were sent before the gap: never store them
        self._inflight.clear()
        self._negative.clear()  # "no such key" may have changed too, and the filter is off
        self._metrics.listener_up.set(0)

    def _clear(self) -> None:
        self._epoch += 1
        self._inflight.clear()
        dropped = len(self)
        self._positive.clear()
        self._negative.clear()
        if dropped:
            self._evicted["cleared"].inc(dropped)
        self.report_size()

    def report_size(self) -> None:
        """Publish the entry counts (called periodically rather than on every change)."""
        self._metrics.cache_entries.labels("positive").set(len(self._positive))
        self._metrics.cache_entries.labels("negative").set(len(self._negative))

    def _fetch(self, secret_hash: bytes) -> asyncio.Future[KeyRecord | None]:
        future = self._inflight.get(secret_hash)
        if future is None:
            if len(self._inflight) >= self._max_pending:
                # The database is not keeping up (or not answering): queueing more callers would
                # only grow memory and make each wait longer. Refuse this one now.
                self._outcome["overloaded"].inc()
                raise LookupsOverloaded()
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume)
            self._inflight[secret_hash] = future
            self._queue.append((secret_hash, future))
            self._schedule_dispatch()
        # Shielded: one caller giving up must not cancel the load the others are waiting on.
        return asyncio.shield(future)

    def _schedule_dispatch(self) -> None:
        """Dispatch on the next loop turn: every coroutine runnable in this one joins the batch."""
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and len(self._loads_started) < MAX_CONCURRENT_LOADS:
            if self._loads_started:
                waited = self._clock() - self._loads_started[-1]
                if waited < STALLED_LOAD:  # the newest load may yet answer: let the queue wait
                    loop.call_later(STALLED_LOAD - waited, self._schedule_dispatch)
                    return
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            started = self._clock()
            self._loads_started.append(started)
            # The epoch is taken before the query is sent: any event after this point fences it.
            fill = loop.create_task(self._fill(batch, self._epoch, started))
            self._fills.add(fill)
            fill.add_done_callback(self._fills.discard)

    async def _fill(
        self, waiters: list[tuple[bytes, asyncio.Future[KeyRecord | None]]], epoch: int, started: float
    ) -> None:
        try:
            # A hash can appear twice: a load detached by invalidate() and its fresh replacement.
            hashes = list(dict.fromkeys(secret_hash for secret_hash, _ in waiters))
            self._metrics.lookup_batch_size.observe(len(hashes))
            try:
                found = await self._load(hashes)
            except Exception as exc:
                for secret_hash, future in waiters:
                    self._settle(secret_hash, future)
                    if not future.done():
                        future.set_exception(exc)
                return
            # --cache-max-entries 0 stores nothing; a moved epoch means a key changed meanwhile.
            caching = self.armed and self._max_entries > 0
            keep = caching and epoch == self._epoch
            if caching and not keep:
                self._metrics.cache_fills_discarded.inc()
            deadline = self._clock() + self._max_staleness
            for secret_hash, future in waiters:
                record = found.get(secret_hash)
                if keep:
                    self._store(secret_hash, record, deadline)
                self._settle(secret_hash, future)
                if not future.done():
                    future.set_result(record)
        finally:
            self._loads_started.remove(started)
            if self._queue:
                # Not at once: first let the callers just answered finish and the loop read
                # the requests that arrived meanwhile, so that their misses leave in this batch.
                self._schedule_dispatch()

    def _settle(self, secret_hash: bytes, future: asyncio.Future[KeyRecord | None]) -> None:
        if self._inflight.get(secret_hash) is future:
            del self._inflight[secret_hash]

    def _store(self, secret_hash: bytes, record: KeyRecord | None, deadline: float) -> None:
        if record is not None:
            self._positive[secret_hash] = CachedKey(record, deadline)
            if len(self._positive) > self._max_entries:
                self._positive.popitem(last=False)
                self._evicted["capacity"].inc()
        elif self._negative_max_entries > 0:
            self._negative[secret_hash] = deadline
            if len(self._negative) > self._negative_max_entries:
                self._negative.popitem(last=False)
                self._evicted["capacity"].inc()
