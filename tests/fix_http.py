"""An upstream that echoes the headers it received, and a plain HTTP GET: for the gateway tests."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import urllib.error
import urllib.request
from typing import IO, Any


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the stdlib's name
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class EchoUpstream:
    """An HTTP server on a free port answering every GET with the request's headers as JSON."""

    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


Answer = tuple[int, dict[str, str], bytes]


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of a GET on 127.0.0.1 (error statuses included)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


class GatewayProcess:
    """A gateway (Envoy, nginx, Caddy) in front of an EchoUpstream; subclasses start ``proc``."""

    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    port: int

    def __init__(self) -> None:
        self.echo = EchoUpstream()

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        """A GET through the gateway."""
        return http_get(self.port, path, headers)

    def close(self) -> None:
        """Stop the gateway and the upstream."""
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        self.echo.close()
