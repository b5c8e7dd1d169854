"""Prometheus metrics: what operators (and ``make bench``) read off a running server.

Each server owns a ``ServerMetrics`` with its own registry, so that several servers in one
process (the tests) never share counters. With ``--workers N`` the supervisor points
``prometheus_client`` at a shared directory before it starts the workers, and its ``/metrics``
sums every worker's values (``prometheus_client``'s multiprocess mode).

The verification path must not pay for Prometheus on every call (two ``Counter.inc`` cost more
than the rest of a cache hit), so its counters are ``HotCounter``: a plain integer bumped per
call and published to the Prometheus counter in one step, whenever ``/metrics`` is scraped (in a
lone server) and by the server's housekeeping loop (so workers' totals lag by at most one
health-check interval).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from .model import VerifyResult

CACHE_OUTCOMES: Final = ("hit", "negative_hit", "filtered", "miss", "bypass", "overloaded")
EVICTION_REASONS: Final = ("capacity", "expired", "invalidated", "cleared")
_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class HotCounter:
    """A counter for the hot path: ``inc`` adds to an int; ``publish`` moves the sum to Prometheus."""

    __slots__ = ("_child", "_published", "value")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._published = 0
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Count ``amount`` more."""
        self.value += amount

    def publish(self) -> None:
        """Add what was counted since the last publish to the Prometheus counter."""
        value = self.value
        if value != self._published:
            self._child.inc(value - self._published)
            self._published = value


class _PublishOnScrape(Collector):
    """Registered first: publishes the hot counters before the registry reads the counters."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[object]:  # type: ignore[override]
        self._metrics.publish()
        return ()


class ServerMetrics:
    """Every metric one server process exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._publish_lock = threading.Lock()  # scrapes come from the HTTP thread
        reg.register(_PublishOnScrape(self))
        verifications = Counter(
            "keystile_verifications", "VerifyKey answers, by result.", ["result"], registry=reg
        )
        self.verifications = {r: HotCounter(verifications.labels(r.value)) for r in VerifyResult}
        lookups = Counter(
            "keystile_cache_lookups",
            "Verification cache lookups: hit, negative_hit (known unknown), filtered (certainly unknown, "
            "no query), miss, bypass (cache off), "
            "overloaded (refused: too many lookups waiting).",
            ["outcome"],
            registry=reg,
        )
        self.cache_lookups = {outcome: HotCounter(lookups.labels(outcome)) for outcome in CACHE_OUTCOMES}
        evictions = Counter(
            "keystile_cache_evictions", "Cache entries removed, by reason.", ["reason"], registry=reg
        )
        self.cache_evictions = {reason: evictions.labels(reason) for reason in EVICTION_REASONS}
        self.cache_fills_discarded = Counter(
            "keystile_cache_fills_discarded",
            "Lookups not cached because a key changed while they were in flight.",
            registry=reg,
        )
        self.cache_entries = Gauge(
            "keystile_cache_entries",
            "Entries in the verification cache, by kind.",
            ["kind"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.lookup_batch_size = Histogram(
            "keystile_lookup_batch_keys",
            "Keys fetched per batched lookup query.",
            registry=reg,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        queries = Counter(
            "keystile_db_queries", "Database statements run, by operation.", ["op"], registry=reg
        )
        self._queries = queries
        self.key_events = Counter(
            "keystile_key_events", "Key change notifications received from PostgreSQL.", registry=reg
        )
        self.key_event_lag = Histogram(
            "keystile_key_event_lag_seconds",
            "From a key change in PostgreSQL until this process evicted it.",
            registry=reg,
            buckets=_LAG_BUCKETS,
        )
        self.listener_up = Gauge(
            "keystile_key_listener_up",
            "1 while the LISTEN connection is live and the cache serves; 0 while it is bypassed.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.key_filter_keys = Gauge(
            "keystile_key_filter_keys",
            "Key hashes in this process's filter of stored keys.",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.key_filter_ready = Gauge(
            "keystile_key_filter_ready",
            "1 while the filter of stored keys is loaded and consulted; 0 while unknown keys are looked up.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.key_filter_load_seconds = Gauge(
            "keystile_key_filter_load_seconds",
            "How long the last load of the filter of stored keys took.",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.key_filter_bytes = Gauge(
            "keystile_key_filter_bytes",
            "Memory held by this process's filter of stored keys.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.watchers = Gauge(
            "keystile_watch_subscribers",
            "Open WatchKeyEvents streams.",
            registry=reg,
            multiprocess_mode="livesum",
        )

    def publish(self) -> None:
        """Move every hot counter's new counts to Prometheus."""
        with self._publish_lock:
            for counter in (*self.verifications.values(), *self.cache_lookups.values()):
                counter.publish()

    def count_query(self, operation: str) -> None:
        """Count one database statement (the store calls this for each one it runs)."""
        self._queries.labels(operation).inc()
