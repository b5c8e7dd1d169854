"""A TCP proxy in front of PostgreSQL that tests can cut and restore: a real network fault.

Servers under test connect through it; ``cut()`` closes every connection and refuses new
ones, ``restore()`` listens again on the same port. ``freeze()`` stops forwarding without
closing anything (a network that silently drops packets), ``thaw()`` resumes. Works for TCP
servers and Unix-socket servers (the embedded PostgreSQL) alike. ``blackhole_existing()`` stops
forwarding on the connections open now but lets new ones through, as after a failover or a
dropped conntrack entry: the peer is silent, not gone, and nothing tells the client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from fix_db import conninfo_host_port
from psycopg.conninfo import make_conninfo


class PgProxy:
    def __init__(self, target_conninfo: str) -> None:
        host, port = conninfo_host_port(target_conninfo)
        self._target: tuple[int, object] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: set[socket.socket] = set()
        self._per_connection: list[threading.Event] = []  # one per connection: set while it flows
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()
        self.conninfo = make_conninfo(target_conninfo, host="127.0.0.1", port=str(self.port))

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            family, address = self._target
            upstream = socket.socket(family)
            try:
                upstream.connect(address)  # type: ignore[arg-type]
            except OSError:
                client.close()
                continue
            flows = threading.Event()
            flows.set()
            with self._lock:
                self._sockets.update((client, upstream))
                self._per_connection.append(flows)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, flows), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flows: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                # Frozen or black-holed: hold the bytes, as a silent route would.
                self._flowing.wait()
                flows.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and drop every open one, as a dead network would."""
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave that
            # accept() able to take one more connection.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def freeze(self) -> None:
        """Stop delivering bytes in either direction, keeping every connection open."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Deliver bytes again (including those held while frozen)."""
        self._flowing.set()

    def blackhole_existing(self) -> None:
        """Stop delivering bytes on every connection open now; new connections flow as usual."""
        with self._lock:
            for flows in self._per_connection:
                flows.clear()

    def release_blackhole(self) -> None:
        """Deliver bytes on the black-holed connections again."""
        with self._lock:
            for flows in self._per_connection:
                flows.set()

    def close(self) -> None:
        self.thaw()
        self.release_blackhole()
        self.cut()


@pytest.fixture
def pg_proxy(database_url: str) -> Iterator[PgProxy]:
    proxy = PgProxy(database_url)
    yield proxy
    proxy.close()
