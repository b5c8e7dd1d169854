"""Allowances: a process's side of the limits, spending leased units from memory.

A VALID verification of a key with limits or credits spends ``cost`` units. This process holds,
per key, an ``Allowance``: units leased from the database by one ``lease_units`` statement
(store/usage_store.py), good until a deadline. Spending them is a subtraction; only when none
are left (or they expired) does a verification wait for another lease, and every verification
waiting on the same key shares it. When the database refuses (a limit or the credits are
exhausted) the allowance remembers until when, and answers RATE_LIMITED or USAGE_EXCEEDED from
memory until then.

Why the bound holds whatever this process does: units only exist once the database granted
them, a lease's deadline is counted from before its statement was sent (so it ends no later
than the database's), and units are dropped (never given back) when the key changes, when its
snapshot is replaced, or when they expire. Losing units is always safe; docs/LIMITS.md has the
whole argument.

How many units to ask for follows the key's traffic (``keystile._limits.LeaseSizer``): about
what this process was asked for over as long as the last lease lasted. The database grants at
most a quarter of what is left, so batches shrink as a window nears its limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from keystile._limits import LEASE_SHARE, LeaseSizer

from ..metrics import ServerMetrics
from ..model import KeyRecord, Lease, LimitStatus, Verification, VerifyResult
from ..store.usage_store import LeaseResult, UsageStore
from .rules import CREDITS, Counters, counters_of

MAX_ROUNDS: Final = 4
"""Leases one verification waits for before it is refused as contended (RATE_LIMITED)."""
SCHEDULE: Final = 5
"""Periods (each about a twentieth of the window) one lease may cover for a key far from its limits.

Fewer leases for busy keys; the database grants a schedule only while half of every limit stays
free after it, so the units of a period that go unspent are never missed.
"""
AHEAD_SHARE: Final = 1.5
"""A schedule's units per period, as a share of the expected demand: running short mid-schedule
would cost a lease (and drop the rest of the schedule), while leftovers are not missed."""
MAX_ALLOWANCES: Final = 100_000
"""Keys whose allowances one process keeps; beyond, the oldest is dropped (its units are lost)."""


class _Counter:
    """Where one counter (a rate limit or the credits) stood after the last lease."""

    __slots__ = ("limit_status", "remaining", "reset_at")

    def __init__(self, limit_status: LimitStatus, remaining: int, reset_at: float) -> None:
        self.limit_status = limit_status
        self.remaining = remaining
        self.reset_at = reset_at


class Allowance:
    """Units one process may admit for one key snapshot, and the refusal while there are none."""

    __slots__ = (
        "ahead",
        "answers",
        "counters",
        "fast_until",
        "fast_verdict",
        "leasing",
        "low_water",
        "per_period",
        "period",
        "periods_left",
        "plentiful",
        "record",
        "refusal",
        "refused_until",
        "room",
        "shown",
        "sizer",
        "units",
        "until",
    )

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.counters: Counters = counters_of(record)
        self.units = 0
        self.until = -math.inf
        self.refused_until = -math.inf
        self.refusal = VerifyResult.RATE_LIMITED
        self.room = 0
        """While refused: the most units the database could still grant (a smaller cost may pass)."""
        self.shown: _Counter | None = None
        """The counter closest to exhaustion: what responses describe."""
        self.sizer = LeaseSizer()
        self.leasing: asyncio.Future[None] | None = None
        self.low_water = 0
        """Below this many units, the next lease is asked for ahead (0: not ahead)."""
        self.plentiful = False
        """The last lease left every limit at least half free (and the key has no credits)."""
        self.ahead = False
        """Plentiful, and this process's demand far below every limit: lease ahead of need."""
        self.per_period = 0
        self.period = 0.0
        self.periods_left = 0
        """A schedule's further periods (``until`` ends the current one), each with ``per_period``."""
        self.answers: dict[VerifyResult, tuple[int, Verification]] = {}
        """The verdict last answered for each result, with the whole seconds of reset it carries."""
        self.fast_verdict: Verification | None = None
        self.fast_until = -math.inf
        """Until when ``fast_verdict`` (VALID) may answer a use while units last: not refused, the
        lease not expired, and its reset still the same whole second."""

    def status(self, now: float) -> LimitStatus | None:
        """The deciding limit's status now: what remains is the database's figure plus ours.

        ``reset`` is rounded up to whole seconds, as Retry-After and RateLimit headers give it
        (0: nothing comes back by itself).
        """
        shown = self.shown
        if shown is None:
            return None
        base = shown.limit_status
        return LimitStatus(
            base.name,
            base.limit,
            shown.remaining + self.units,
            float(_whole_seconds(shown.reset_at - now)),
            base.window_ms,
            base.owner,
        )

    def answer(self, result: VerifyResult, now: float) -> Verification:
        """The verdict to answer with: the same object while its status reads the same second.

        A reused verdict lets the transport memoize its serialized response (as for keys without
        limits), so a rate-limited key's hit costs a few attribute updates, not a response built
        per call. The ``remaining`` it shows is as of when it was made: an upper bound, as a rate
        limit's remaining always is (other processes hold units too).
        """
        shown = self.shown
        second = _whole_seconds(shown.reset_at - now) if shown is not None else 0
        memo = self.answers.get(result)
        if memo is not None and memo[0] == second:
            verdict = memo[1]
        else:
            verdict = Verification(result, self.record, True, self.status(now))
            self.answers[result] = (second, verdict)
        if result is VerifyResult.VALID:
            self.fast_verdict = verdict
            stale = shown.reset_at - second + 1 if shown is not None and second else math.inf
            self.fast_until = min(self.until, stale)
        return verdict

    def next_period(self, now: float) -> None:
        """Move to the schedule's period holding ``now``: its own units; the last one's are lost."""
        skipped = min(self.periods_left, int((now - self.until) // self.period) + 1)
        self.until += skipped * self.period
        self.periods_left -= skipped
        self.units = self.per_period
        self.low_water = self.per_period // 8 if self.ahead and not self.periods_left else 0


class Allowances:
    """Every key's allowance in this process; the verification path's entry to the limits."""

    def __init__(
        self,
        store: UsageStore,
        *,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_ALLOWANCES,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_keys = max_keys
        self._by_hash: OrderedDict[bytes, Allowance] = OrderedDict()
        self._verdicts = metrics.verifications
        self._valid = metrics.verifications[VerifyResult.VALID]

    def __len__(self) -> int:
        return len(self._by_hash)

    def drop(self, secret_hash: bytes) -> None:
        """Forget a key's units and refusal: it changed (limits, credits, revocation)."""
        self._by_hash.pop(secret_hash, None)

    def clear(self) -> None:
        """Forget every allowance (events may have been missed)."""
        self._by_hash.clear()

    def _allowance(self, record: KeyRecord) -> Allowance:
        allowance = self._by_hash.get(record.secret_hash)
        if allowance is not None and allowance.record is not record and _same_terms(allowance.record, record):
            allowance.record = record  # a reload of the same limits keeps its units
        elif allowance is None or allowance.record is not record:
            # Other limits start afresh: units leased under those must not be spent under these.
            allowance = Allowance(record)
            self._by_hash[record.secret_hash] = allowance
            if len(self._by_hash) > self._max_keys:
                self._by_hash.popitem(last=False)
        return allowance

    def spend(self, record: KeyRecord, cost: int, now: float) -> Verification | None:
        """The verdict for a VALID key's use, from memory; None when a lease is needed first.

        ``now`` is the monotonic clock. Counts the verdict's result.
        """
        allowance = self._by_hash.get(record.secret_hash)
        if allowance is None or allowance.record is not record:
            return None
        allowance.sizer.demand += cost
        # The common case, kept to a few attribute updates: units in hand, nothing changed.
        if now < allowance.fast_until and allowance.units >= cost:
            allowance.units -= cost
            if allowance.units < allowance.low_water and allowance.leasing is None:
                self._ahead(allowance)
            self._valid.inc()
            return allowance.fast_verdict
        return self._spend(allowance, cost, now)

    def _ahead(self, allowance: Allowance) -> None:
        """Lease the next batch before this one runs out, so that no verification waits for it.

        Only for keys far from their limits (see ``_refill``): the new batch replaces what is
        left of this one, which is lost, harmless with room to spare.
        """
        allowance.leasing = asyncio.ensure_future(self._refill(allowance, 1))
        allowance.leasing.add_done_callback(_ignore_failure)

    def _spend(self, allowance: Allowance, cost: int, now: float) -> Verification | None:
        if now >= allowance.until and allowance.periods_left:
            allowance.next_period(now)
        if allowance.units >= cost and now < allowance.until:
            allowance.units -= cost
            result = VerifyResult.VALID
        elif now < allowance.refused_until and cost > allowance.room:
            result = allowance.refusal
        else:
            return None
        self._verdicts[result].inc()
        return allowance.answer(result, now)

    async def admit(self, record: KeyRecord, cost: int) -> Verification:
        """The verdict for a VALID key's use, leasing units as needed (StoreUnavailable if it cannot)."""
        allowance = self._allowance(record)
        allowance.sizer.demand += cost
        for _ in range(MAX_ROUNDS):
            verdict = self._spend(allowance, cost, self._clock())
            if verdict is not None:
                return verdict
            if allowance.leasing is None:
                allowance.leasing = asyncio.ensure_future(self._refill(allowance, cost))
            await asyncio.shield(allowance.leasing)
        # Others took every unit leased meanwhile: refuse this one rather than queue for good.
        self._verdicts[VerifyResult.RATE_LIMITED].inc()
        return Verification(VerifyResult.RATE_LIMITED, record, False, allowance.status(self._clock()))

    async def _refill(self, allowance: Allowance, cost: int) -> None:
        try:
            now = self._clock()
            # Far from every limit, and this process alone asking for under a quarter of each: a
            # schedule of periods, each with more than the expected demand (see SCHEDULE). A
            # process cannot see the others' demand, so its own must leave room for them.
            rate = allowance.sizer.rate(now)
            far = rate > 0 and all(
                4 * rate * window_ms < 1000 * cap
                for window_ms, cap in zip(allowance.counters.windows_ms, allowance.counters.caps, strict=True)
            )
            ahead = allowance.plentiful and far
            want = allowance.sizer.want(now, cost, AHEAD_SHARE if ahead else LEASE_SHARE)
            result = await self._lease(
                allowance.counters, allowance.record, want, cost, SCHEDULE if ahead else 1
            )
            allowance.sizer.leased(now, result.valid_ms / 1000)
            if result.granted:
                allowance.units, allowance.until = result.granted, now + result.valid_ms / 1000
                allowance.per_period, allowance.period = result.granted, result.period_ms / 1000
                allowance.periods_left = result.periods - 1
                allowance.refused_until = -math.inf
                # Far from every limit (and without credits, which a dropped unit would lose for
                # good): ask ahead once an eighth of the last period's units is left.
                allowance.plentiful = allowance.record.credits is None and all(
                    2 * remaining >= cap
                    for remaining, cap in zip(result.remaining, allowance.counters.caps, strict=True)
                )
                allowance.ahead = allowance.plentiful and far
                allowance.low_water = (
                    result.granted // 8 if allowance.ahead and not allowance.periods_left else 0
                )
            else:
                allowance.refusal, allowance.refused_until = _refusal(result, cost, now)
                allowance.room = _room(result)
                allowance.low_water = 0
            allowance.shown = _deciding(allowance.record, allowance.counters, result, now)
            allowance.answers.clear()
            allowance.fast_until = -math.inf
        finally:
            allowance.leasing = None

    async def lease_for_client(self, record: KeyRecord, cost: int, units: int) -> Verification:
        """Admit one use and lease up to ``units`` more to a caching client, in one statement.

        The client's units come straight from the database, never from this process's own.
        """
        now = self._clock()
        counters = counters_of(record)
        result = await self._lease(counters, record, cost + units, cost)
        probe = Allowance(record)
        probe.shown = _deciding(record, counters, result, now)
        if not result.granted:
            refusal, _ = _refusal(result, cost, now)
            self._verdicts[refusal].inc()
            return Verification(refusal, record, False, probe.status(now))
        self._verdicts[VerifyResult.VALID].inc()
        extra = result.granted - cost
        lease = Lease(extra, result.valid_ms / 1000) if extra > 0 else None
        return Verification(VerifyResult.VALID, record, False, probe.status(now), lease)

    async def _lease(
        self, counters: Counters, record: KeyRecord, want: int, need: int, periods: int = 1
    ) -> LeaseResult:
        return await self._store.lease(
            counters.names,
            counters.caps,
            counters.windows_ms,
            credit_key=record.grant if counters.credits else None,
            want=want,
            need=need,
            periods=periods,
        )


def _ignore_failure(future: asyncio.Future[None]) -> None:
    """A lease asked for ahead failed (the database is down): the next use will ask again."""
    if not future.cancelled():
        future.exception()


def _whole_seconds(seconds: float) -> int:
    """``seconds`` rounded up to whole seconds; 0 for none left or an endless wait."""
    return math.ceil(seconds) if 0.0 < seconds < math.inf else 0


def _room(result: LeaseResult) -> int:
    """The most units every counter could still grant."""
    rooms = [*result.remaining, *(() if result.credits_left is None else (result.credits_left,))]
    return min(rooms, default=0)


def _same_terms(old: KeyRecord, new: KeyRecord) -> bool:
    return old.limits == new.limits and old.owner_limits == new.owner_limits and old.credits == new.credits


def _refusal(result: LeaseResult, cost: int, now: float) -> tuple[VerifyResult, float]:
    """Why a lease granted nothing, and until when to answer so without asking again.

    Credits short of the cost make USAGE_EXCEEDED until the next refill (or until an admin adds
    some: that is a key event, which drops the allowance). Otherwise a rate limit is exhausted
    until the latest of the exhausted counters frees units.
    """
    if result.credits_left is not None and result.credits_left < cost:
        wait = result.credits_reset_ms / 1000 if result.credits_reset_ms is not None else math.inf
        return VerifyResult.USAGE_EXCEEDED, now + wait
    waits = [
        reset / 1000
        for remaining, reset in zip(result.remaining, result.reset_ms, strict=True)
        if remaining < cost
    ]
    return VerifyResult.RATE_LIMITED, now + (max(waits) if waits else 0.0)


def _deciding(record: KeyRecord, counters: Counters, result: LeaseResult, now: float) -> _Counter | None:
    """The counter with the fewest units left (the latest reset breaking ties)."""
    best: _Counter | None = None
    for index, limit in enumerate(counters.limits):
        status = LimitStatus(limit.name, limit.cap, 0, 0.0, limit.window_ms, counters.owner[index])
        candidate = _Counter(status, result.remaining[index], now + result.reset_ms[index] / 1000)
        best = _fewer(best, candidate)
    if result.credits_left is not None:
        reset = result.credits_reset_ms / 1000 if result.credits_reset_ms is not None else math.inf
        status = LimitStatus(CREDITS, record.credits.refill_amount if record.credits else 0, 0, 0.0)
        best = _fewer(best, _Counter(status, result.credits_left, now + reset))
    return best


def _fewer(best: _Counter | None, candidate: _Counter) -> _Counter:
    if best is None or (candidate.remaining, -candidate.reset_at) < (best.remaining, -best.reset_at):
        return candidate
    return best
