"""VerdictCache: the in-process verdict cache behind ``Client(cache=True)``, per docs/CACHING.md.

A verdict is cached under (SHA-256 of the key, required scopes, resource) and served only while
the WatchKeyEvents stream that protects it is known to be healthy: READY received, the last
message no older than ``SILENCE_FACTOR`` heartbeat intervals. Every rule that keeps a cached
verdict from outliving the truth is here, in one place, so that the sync and asyncio clients
(and the document other languages follow) cannot drift apart:

- INVALIDATE drops every verdict for the named hashes; READY, a broken stream and a silent one
  drop everything.
- A verdict fetched while an event arrived (the epoch moved) is returned but not stored, so a
  lookup racing a revocation cannot put the old answer back.
- No verdict is served older than ``max_staleness`` (the smaller of the client's and the
  server's), nor past the key's own ``expire_time``.
- A key with limits or credits (its responses carry ``limit``) is admitted from memory only
  while units leased from the server last (``_Allowance``): the client asks for ``lease_units``
  with every verification it sends, spends them until the lease's ``valid_for`` (counted from
  when the request was sent) and answers a refusal from memory until its ``reset``. Units are
  dropped, never given back, with the key's verdicts.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

from ._format import hash_key
from ._limits import LeaseSizer
from .v1 import keys_pb2

SILENCE_FACTOR: Final = 3.0
"""A stream with no message for this many heartbeat intervals is treated as dead."""

_Entry = tuple[keys_pb2.VerifyKeyResponse, float, float]  # response, stale-after, expires-at (wall)
_NEVER: Final = float("inf")
_REFUSALS: Final = frozenset({keys_pb2.VERIFY_RESULT_RATE_LIMITED, keys_pb2.VERIFY_RESULT_USAGE_EXCEEDED})


class _Allowance:
    """Units leased for one key, the VALID response they answer with, and a refusal's deadline."""

    __slots__ = ("refusal", "refused_until", "response", "sizer", "units", "until")

    def __init__(self) -> None:
        self.units = 0
        self.until = -_NEVER
        self.response: keys_pb2.VerifyKeyResponse | None = None
        self.refusal: keys_pb2.VerifyKeyResponse | None = None
        self.refused_until = -_NEVER
        self.sizer = LeaseSizer()


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a client's verdict cache, for tests, dashboards and ``keystile bench``."""

    live: bool
    entries: int
    hits: int
    misses: int
    invalidations: int
    resets: int


class PendingVerdict(NamedTuple):
    """A verdict to ask the server for, and the epoch it was asked under (rule 5: fencing).

    ``sent`` is when (this cache's clock) it was asked for: a lease's units last from then.
    """

    secret_hash: bytes
    scopes: tuple[str, ...]
    resource: str
    epoch: int
    sent: float = 0.0


class VerdictCache:
    """Thread-safe verdict cache; the client feeds it stream events and asks it before each RPC."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_staleness: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_entries = max_entries
        self._client_max_staleness = max_staleness
        self._max_staleness = max_staleness
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[bytes, tuple[str, ...], str], _Entry] = OrderedDict()
        self._by_hash: dict[bytes, set[tuple[bytes, tuple[str, ...], str]]] = {}
        self._allowances: dict[bytes, _Allowance] = {}
        self._live = False
        self._silent_after = 0.0
        self._heartbeat = 0.0
        self.epoch = 0
        self._hits = self._misses = self._invalidations = self._resets = 0
        self.on_silence: Callable[[], None] | None = None
        """Called (outside the lock) when a silent stream is detected, to abandon it."""

    def get(
        self, secret_hash: bytes, scopes: tuple[str, ...], resource: str
    ) -> keys_pb2.VerifyKeyResponse | None:
        """The cached verdict, or None: ask the server (and ``put`` its answer)."""
        now = self._clock()
        with self._lock:
            silent = self._live and now > self._silent_after
            if silent:  # heartbeats stopped: the stream may be dead without saying so
                self._reset(live=False)
            if not self._live:
                self._misses += 1
                entry = None
            else:
                entry = self._entries.get((secret_hash, scopes, resource))
                if entry is None or now > entry[1] or self._wall_clock() >= entry[2]:
                    self._misses += 1
                    entry = None
                else:
                    self._hits += 1
        if silent and self.on_silence is not None:
            self.on_silence()
        return entry[0] if entry is not None else None

    def lookup(
        self, key: str, required_scopes: Iterable[str], resource: str
    ) -> tuple[keys_pb2.VerifyKeyResponse | None, PendingVerdict]:
        """The cached verdict for a presented key (or None), and what to ``store`` after asking.

        The epoch is read here, before the caller's RPC: an event while the RPC runs fences it.
        """
        pending = PendingVerdict(hash_key(key), tuple(required_scopes), resource, self.epoch, self._clock())
        return self.get(pending.secret_hash, pending.scopes, resource), pending

    def answer(
        self, key: str, required_scopes: Iterable[str], resource: str, cost: int
    ) -> tuple[keys_pb2.VerifyKeyResponse | None, PendingVerdict, int]:
        """The answer from memory, or None with what to ask the server.

        That is the pending verdict (to ``store`` with the server's answer) and the
        ``lease_units`` to send with it.
        """
        cached, pending = self.lookup(key, required_scopes, resource)
        if cached is not None:
            if not cached.HasField("limit"):
                return cached, pending, 0
            spent = self.spend(pending.secret_hash, cost or 1)
            if spent is not None:
                return spent, pending, 0
        return None, pending, self.lease_size(pending.secret_hash, cost or 1)

    def store(self, pending: PendingVerdict, response: keys_pb2.VerifyKeyResponse) -> None:
        """Keep the server's answer to ``pending``, unless anything changed since it was asked."""
        if response.HasField("limit"):
            self._leased(pending, response, pending.sent)
        self.put(pending.secret_hash, pending.scopes, pending.resource, response, pending.epoch)

    def spend(self, secret_hash: bytes, cost: int) -> keys_pb2.VerifyKeyResponse | None:
        """For a cached verdict that carries ``limit``: the answer from leased units, or None.

        None means: ask the server (with ``lease_size`` units) and ``store`` its answer.
        """
        now = self._clock()
        with self._lock:
            allowance = self._allowances.get(secret_hash)
            if allowance is None:
                return None
            allowance.sizer.demand += cost
            if now < allowance.refused_until:
                return allowance.refusal
            if allowance.units >= cost and now < allowance.until:
                allowance.units -= cost
                return allowance.response
            return None

    def lease_size(self, secret_hash: bytes, cost: int) -> int:
        """How many units beyond this call's ``cost`` to ask for with its verification."""
        now = self._clock()
        with self._lock:
            if not self._live:
                return 0  # nothing leased could be kept: ask for no more than this call's units
            allowance = self._allowances.get(secret_hash)
            if allowance is None:
                return 0  # not known to be limited yet
            return allowance.sizer.want(now, cost) - cost

    def _leased(self, pending: PendingVerdict, response: keys_pb2.VerifyKeyResponse, sent: float) -> None:
        with self._lock:
            if not self._live or pending.epoch != self.epoch:
                return  # the key changed meanwhile: units leased for the old one are dropped
            allowance = self._allowances.setdefault(pending.secret_hash, _Allowance())
            allowance.sizer.leased(sent, response.lease.valid_for.ToNanoseconds() / 1e9)
            if response.result in _REFUSALS:
                allowance.units = 0
                reset = response.limit.reset.ToNanoseconds() / 1e9
                allowance.refusal = response
                allowance.refused_until = sent + (reset if reset > 0 else self._max_staleness)
            elif response.result == keys_pb2.VERIFY_RESULT_VALID:
                allowance.response = response
                allowance.units = response.lease.units
                allowance.until = sent + response.lease.valid_for.ToNanoseconds() / 1e9

    @property
    def live(self) -> bool:
        """Whether cached verdicts may be served right now."""
        with self._lock:
            return self._live and self._clock() <= self._silent_after

    def put(
        self,
        secret_hash: bytes,
        scopes: tuple[str, ...],
        resource: str,
        response: keys_pb2.VerifyKeyResponse,
        epoch: int,
    ) -> None:
        """Store a verdict fetched when ``epoch`` was current; dropped if anything changed since."""
        if response.result == keys_pb2.VERIFY_RESULT_UNSPECIFIED:
            return
        expires = _NEVER
        if response.HasField("key") and response.key.HasField("expire_time"):
            expires = response.key.expire_time.seconds + response.key.expire_time.nanos / 1e9
        with self._lock:
            if not self._live or epoch != self.epoch or self._max_entries <= 0:
                return
            key = (secret_hash, scopes, resource)
            self._entries[key] = (response, self._clock() + self._max_staleness, expires)
            self._by_hash.setdefault(secret_hash, set()).add(key)
            if len(self._entries) > self._max_entries:
                old, _ = self._entries.popitem(last=False)
                self._forget(old)

    def _forget(self, key: tuple[bytes, tuple[str, ...], str]) -> None:
        keys = self._by_hash.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_hash[key[0]]

    def ready(self, heartbeat_interval: float, server_max_staleness: float) -> None:
        """READY: start caching from empty under the stream's heartbeat and staleness terms."""
        with self._lock:
            self._reset(live=True)
            self._heartbeat = heartbeat_interval
            self._max_staleness = min(self._client_max_staleness, server_max_staleness or _NEVER)
            self._silent_after = self._clock() + SILENCE_FACTOR * heartbeat_interval

    def heard(self) -> None:
        """Any message arrived: the stream is alive."""
        with self._lock:
            self._silent_after = self._clock() + SILENCE_FACTOR * self._heartbeat

    def invalidate(self, hashes: Iterable[bytes]) -> None:
        """INVALIDATE: drop every verdict for these keys and fence fills in flight."""
        with self._lock:
            self.epoch += 1
            self._silent_after = self._clock() + SILENCE_FACTOR * self._heartbeat
            for secret_hash in hashes:
                self._allowances.pop(secret_hash, None)
                for key in self._by_hash.pop(secret_hash, ()):
                    self._entries.pop(key, None)
                    self._invalidations += 1

    def broken(self) -> None:
        """The stream ended or failed: serve nothing from memory until the next READY."""
        with self._lock:
            self._reset(live=False)

    def _reset(self, *, live: bool) -> None:
        self.epoch += 1
        if self._entries or self._live:
            self._resets += 1
        self._entries.clear()
        self._by_hash.clear()
        self._allowances.clear()
        self._live = live

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                live=self._live and self._clock() <= self._silent_after,
                entries=len(self._entries),
                hits=self._hits,
                misses=self._misses,
                invalidations=self._invalidations,
                resets=self._resets,
            )


def apply_event(cache: VerdictCache, event: keys_pb2.WatchKeyEventsResponse) -> bool:
    """Feed one WatchKeyEvents message to ``cache``; False means the stream is unusable."""
    if event.type == keys_pb2.KEY_EVENT_TYPE_INVALIDATE:
        cache.invalidate(event.key_hashes)
    elif event.type == keys_pb2.KEY_EVENT_TYPE_HEARTBEAT:
        cache.heard()
    elif event.type == keys_pb2.KEY_EVENT_TYPE_READY:
        cache.ready(
            event.heartbeat_interval.ToTimedelta().total_seconds(),
            event.max_staleness.ToTimedelta().total_seconds(),
        )
    else:
        return False
    return True
