"""KeyFilter: which key hashes certainly do not exist, answered from memory.

A flood of distinct, well-formed, unknown keys cannot be cached away: each is new. Without this
filter every one of them costs a database lookup, and real keys queue behind them. So each
process keeps a Bloom filter of every stored key hash: a hash the filter has never seen is
certainly unknown (VERIFY_RESULT_NOT_FOUND, no query); one it has seen may exist (the rare
false positives cost one lookup, and then sit in the negative cache).

- **Layout**: ``BITS_PER_KEY`` bits per key of capacity (sized for 1.5 times the keys stored
  when loaded: 3 bytes a key then, 2 when full) and ``PROBES`` bit positions per key. SHA-256
  output is uniform, so the positions are simply the hash's eight 32-bit words (native byte
  order), modulo the filter's size: no second hash. At full load about 0.06 % of unknown
  hashes pass; at the usual load, far fewer.
- **Loaded after LISTEN**: the filter is trusted only once it has been loaded from a scan that
  began after the process's key-event listener connected, so every key committed before the
  scan is in it, and every key committed after arrives as an event (``add``). While the listener
  is down (``stop``) the filter is not consulted at all.
- **Created a moment ago elsewhere**: a key created through another process is in this
  process's filter once its creation event arrives (milliseconds; ``keystile_key_event_lag``).
  Until then this process answers NOT_FOUND for it, and never for longer than that delay.
- **Growth**: keys are never removed (a deleted key is just a false positive). When more keys
  have been added than the filter was sized for, it is rebuilt at double the size in the
  background, the old one answering meanwhile (it has no false negatives, only more positives).
- **Loading** pages through the unique index ``PAGE`` hashes per statement (each bounded like any
  other, the page's hashes returned as one value) and yields to the event loop between pages. It
  is sized from the planner's row estimate; a load that fails is retried with backoff (unknown
  keys are looked up meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

_log = logging.getLogger(__name__)

BITS_PER_KEY: Final = 16
PROBES: Final = 8
MIN_CAPACITY: Final = 1 << 16
PAGE: Final = 10_000
RETRY_DELAY: Final = (1.0, 60.0)
"""Seconds before a failed load is tried again: doubling from the first to the second."""

CountKeys = Callable[[], Awaitable[int]]
HashPage = Callable[[bytes, int], Awaitable[bytes]]
"""(after, limit) -> up to ``limit`` stored key hashes greater than ``after``, in order, concatenated."""


class _Bits:
    """One fixed-size Bloom filter over SHA-256 digests."""

    __slots__ = ("bits", "capacity", "count", "size")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = capacity * BITS_PER_KEY  # in bits; a multiple of 8
        self.bits = bytearray(self.size >> 3)
        self.count = 0

    def add_many(self, digests: bytes) -> None:
        """Add a run of concatenated 32-byte digests."""
        bits, size = self.bits, self.size
        for word in memoryview(digests).cast("I"):  # a digest is PROBES words: all of them probe
            position = word % size
            bits[position >> 3] |= 1 << (position & 7)
        self.count += len(digests) // 32

    def contains(self, digest: bytes) -> bool:
        bits, size = self.bits, self.size
        for word in memoryview(digest).cast("I")[:PROBES]:
            position = word % size
            if not bits[position >> 3] & (1 << (position & 7)):
                return False
        return True


class KeyFilter:
    """The process's filter of stored key hashes, with its loader."""

    def __init__(self, count_keys: CountKeys, hash_page: HashPage) -> None:
        self._count_keys = count_keys
        self._hash_page = hash_page
        self._live: _Bits | None = None
        self._building: _Bits | None = None
        self._task: asyncio.Task[None] | None = None
        self.ready = False
        """Whether ``might_contain`` may be trusted: loaded since the listener last connected."""
        self.load_seconds = 0.0
        self._retry_delay = RETRY_DELAY[0]

    @property
    def keys(self) -> int:
        """Keys added to the live filter."""
        return self._live.count if self._live is not None else 0

    @property
    def size_bytes(self) -> int:
        """Memory held by the bit arrays (the live one, and one being built)."""
        return sum(len(b.bits) for b in (self._live, self._building) if b is not None)

    def might_contain(self, digest: bytes) -> bool:
        """False only for a hash that is certainly not stored; True whenever the filter is not ready."""
        live = self._live
        return not self.ready or live is None or live.contains(digest)

    def add(self, digest: bytes) -> None:
        """A key was stored (or changed): make sure the filter can never deny it."""
        for bits in (self._live, self._building):
            if bits is not None:
                bits.add_many(digest)
        if self._task is None or self._task.done():
            self._grow_if_full()

    def _grow_if_full(self) -> None:
        """Past its design load, rebuild larger; the full filter answers meanwhile."""
        live = self._live
        if live is not None and live.count > live.capacity:
            self._start(keep_serving=True)

    def start(self) -> None:
        """The listener (re)connected: load afresh; untrusted until the load completes."""
        self._start(keep_serving=False)

    def stop(self) -> None:
        """The listener is down: changes may go unseen, so the filter is not consulted."""
        self.ready = False
        self._cancel()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._building = None

    def _start(self, *, keep_serving: bool) -> None:
        self._cancel()
        if not keep_serving:
            self.ready = False
        self._task = asyncio.get_running_loop().create_task(self._load(), name="keystile-key-filter")
        self._task.add_done_callback(self._loaded)

    def _loaded(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            _log.warning(
                "key filter not loaded (%s); unknown keys are looked up; retrying in %gs",
                error,
                self._retry_delay,
            )
            self._task = asyncio.get_running_loop().create_task(self._retry(), name="keystile-key-filter")
            self._task.add_done_callback(self._loaded)
            return
        self._retry_delay = RETRY_DELAY[0]
        self._grow_if_full()  # the row estimate it was sized from may have been short

    async def _retry(self) -> None:
        await asyncio.sleep(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, RETRY_DELAY[1])
        await self._load()

    async def _load(self) -> None:
        started = time.monotonic()
        stored = await self._count_keys()
        building = self._building = _Bits(max(MIN_CAPACITY, stored + stored // 2))
        after = b""
        while True:
            page = await self._hash_page(after, PAGE)
            building.add_many(page)
            if len(page) < PAGE * 32:
                break
            after = page[-32:]
        self._live, self._building = building, None
        self.ready = True
        self.load_seconds = time.monotonic() - started
        _log.info(
            "key filter loaded: %d keys, %d KiB, in %.2fs",
            building.count,
            len(building.bits) >> 10,
            self.load_seconds,
        )
