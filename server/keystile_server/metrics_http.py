"""The ``/metrics`` endpoint: Prometheus' own HTTP server on a thread, started and closed safely.

A thread of its own, not the event loop: a scrape is answered even while the loop is busy, and
the ``--workers`` supervisor, which has no loop, serves its aggregated registry the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry, start_http_server

_log = logging.getLogger(__name__)

METRICS_CLOSE_TIMEOUT: Final = 5.0
"""Seconds a stop waits for the /metrics server to close (its thread is a daemon after that)."""


def start_metrics_server(listen: str, registry: CollectorRegistry) -> tuple[Any, int]:
    """Serve ``/metrics`` for ``registry`` on its own port, in a thread; returns (server, port)."""
    host, _, port = listen.rpartition(":")
    try:
        http_server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc.strerror}") from exc
    bound = int(http_server.server_address[1])
    _log.info("metrics on http://%s:%d/metrics", host, bound)
    return http_server, bound


def close_metrics_server(
    http_server: Any, on_closed: Callable[[], object] = lambda: None
) -> threading.Thread:
    """Stop and close the ``/metrics`` server on a thread of its own; returns that thread.

    ``shutdown()`` waits for the serving thread to notice (it polls twice a second), so it must
    not run on the event loop (CI caught it blocking stop() for a minute). Nor on the loop's
    default executor: a stop must not queue behind whatever else holds its few threads (an
    embedded database stopping, a DNS lookup), as CI saw once on a loaded machine. The caller
    waits (``join``, or ``on_closed``) as long as its own bound allows; the thread is a daemon.
    """

    def close() -> None:
        try:
            http_server.shutdown()
            http_server.server_close()
        finally:
            with contextlib.suppress(RuntimeError):  # the waiting loop may have closed since
                on_closed()

    thread = threading.Thread(target=close, name="keystile-metrics-close", daemon=True)
    thread.start()
    return thread
