"""What keeps clients from exhausting a server's connections, streams and file descriptors.

Every connection costs a file descriptor, and a process has a fixed number of them: once they
are gone, new clients cannot connect at all while health still says SERVING. So:

- each connection carries at most ``--max-concurrent-streams`` calls;
- a connection that has not finished its TLS/HTTP/2 set-up within ``--handshake-timeout`` is
  closed (raw idle TCP connections, slowloris-style), and one without calls for
  ``--max-connection-idle`` seconds is sent GOAWAY (clients reconnect when they next need to);
- ``--max-connection-age`` asks long-lived connections to reconnect now and then, which also
  spreads clients over ``--workers`` again, with ``AGE_GRACE`` seconds to finish their calls;
- the server pings a silent client every ``--keepalive-time`` and drops it after
  ``--keepalive-timeout`` without an answer; clients may ping at most every
  ``MIN_CLIENT_PING_INTERVAL`` seconds (more often is an abuse, and ends the connection);
- at start the open-file soft limit is raised to the hard limit, and ``FileDescriptorWatch``
  logs (at most once a minute) when the process nears it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from typing import Any, Final

from .log_throttle import LogThrottle
from .settings import Settings

_log = logging.getLogger(__name__)

AGE_GRACE: Final = 30.0
MIN_CLIENT_PING_INTERVAL: Final = 10.0
FD_WARNING_SHARE: Final = 0.9
"""Share of the open-file limit in use at which the watch starts warning."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_server_options(settings: Settings, *, reuse_port: bool) -> list[tuple[str, Any]]:
    """The gRPC core channel arguments that enforce the limits above."""
    options: list[tuple[str, Any]] = [
        # so_reuseport off unless we are one of --workers: a second server on a taken port must
        # fail loudly, not share it silently.
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.handshake_timeout)),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(MIN_CLIENT_PING_INTERVAL)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(MIN_CLIENT_PING_INTERVAL)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", _ms(settings.max_connection_age)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(AGE_GRACE)))
    return options


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # some sandboxes refuse: keep going with what we have
        _log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    _log.info("open-file limit raised from %d to %d", soft, hard)
    return hard


def open_file_count() -> int | None:
    """How many descriptors this process holds (None where /proc is not available).

    Listing them takes a descriptor too: when none is left, that failure is the answer.
    """
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        return None


class FileDescriptorWatch:
    """Warns when the process nears its open-file limit: past it, new clients cannot connect."""

    def __init__(self) -> None:
        self._throttle = LogThrottle(_log, interval=60.0)

    def check(self) -> None:
        """Log a warning (at most once a minute) when FD_WARNING_SHARE of the limit is in use."""
        used = open_file_count()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if used is None or limit == resource.RLIM_INFINITY or used < limit * FD_WARNING_SHARE:
            return
        self._throttle.log(
            logging.WARNING,
            "fd-limit",
            "open files: %d of the limit of %d; new connections are refused at the limit. Raise it "
            "(ulimit -n, LimitNOFILE=), or lower --max-connection-idle and --handshake-timeout",
            used,
            limit,
        )
