"""A VerificationCache on its own, over a loader the test controls: the cache's rules without a server."""

from __future__ import annotations

from typing import Any

from keystile_server.cache import VerificationCache
from keystile_server.metrics import ServerMetrics


def armed_cache(load: Any, **changes: Any) -> VerificationCache:
    """An armed cache (events deemed flowing) over ``load``, small bounds unless ``changes`` say otherwise."""
    options: dict[str, Any] = {
        "max_entries": 10,
        "negative_max_entries": 10,
        "max_staleness": 60,
        "metrics": ServerMetrics(),
    }
    cache = VerificationCache(load, **(options | changes))
    cache.arm()
    return cache
