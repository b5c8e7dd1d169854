"""HTTP forward-auth (nginx ``auth_request``, Traefik ForwardAuth, Caddy ``forward_auth``).

With ``--http-listen``, keystile answers ``/auth`` (any method) on an aiohttp server running on the
same event loop as the gRPC server. A thin surface, like ``ext_authz``: the key comes from the
same headers (``--auth-key-headers``) or from the query of the original URI the proxy passes
(``X-Original-URI``, ``X-Forwarded-Uri``); the requirements from this endpoint's query
(``/auth?scopes=jobs:read,jobs:write&resource=project-42``) or the ``X-Keystile-Scopes`` and
``X-Keystile-Resource`` headers the proxy sets; ``gateway.decide`` answers. Allowed is 200 with
``x-keystile-*`` headers for the proxy to copy upstream; denials are 401, 403 or 429 with their
headers and a JSON reason; a database that cannot be reached is 503, and a route whose scopes
are invalid is 500 (the proxy's configuration is wrong, not the client).

A forward-auth endpoint cannot remove the credential from the request the proxy forwards: the
proxy's configuration does (docs/GATEWAYS.md shows how for each).
"""

from __future__ import annotations

import json
import logging
from typing import Final

from aiohttp import web

from .errors import InvalidArgument, KeystileError, PermissionDenied, Unauthenticated
from .gateway import GatewayConfig, Routes, decide, find_key
from .handlers import KeyServiceHandlers

PATH: Final = "/auth"
_ORIGINAL_URI: Final = ("x-original-uri", "x-forwarded-uri")

_log = logging.getLogger(__name__)


def _failure(status: int, reason: str) -> web.Response:
    return web.Response(
        status=status, body=json.dumps({"error": reason}).encode(), content_type="application/json"
    )


class ForwardAuth:
    """The ``/auth`` endpoint, over the same domain service as KeyService."""

    def __init__(self, handlers: KeyServiceHandlers, config: GatewayConfig) -> None:
        self._handlers = handlers
        self._config = config
        self._routes = Routes()

    async def auth(self, request: web.Request) -> web.Response:
        """Allow or deny the request the proxy is about to forward."""
        service = self._handlers.service
        if service is None:
            return _failure(503, "unavailable")
        headers = {name.lower(): value for name, value in request.headers.items()}
        original = next((headers[name] for name in _ORIGINAL_URI if headers.get(name)), "")
        key, credential = find_key(headers, original.partition("?")[2], self._config)
        scopes = request.query.get("scopes") or headers.get("x-keystile-scopes", "")
        resource = request.query.get("resource") or headers.get("x-keystile-resource", "")
        try:
            answer = await decide(
                service.verifier,
                key,
                self._routes[(scopes, resource)],
                self._config,
                credential_header=credential,
                authorization=headers.get("x-keystile-authorization", "")
                if service.verify_auth_required
                else "",
            )
        except InvalidArgument as exc:
            _log.warning("forward-auth: the proxy asks for invalid requirements: %s", exc.message)
            return _failure(500, "invalid_requirements")
        except (Unauthenticated, PermissionDenied) as exc:
            _log.warning("forward-auth: the proxy's own key is refused: %s", exc.message)
            return _failure(500, "proxy_not_authorized")
        except KeystileError:  # the database is unreachable or overloaded: unknown, not denied
            return _failure(503, "unavailable")
        if answer.allowed:
            return web.Response(status=200, headers={**answer.upstream_headers, **answer.client_headers})
        return web.Response(status=answer.status, headers=answer.client_headers, body=answer.body)


async def start(
    handlers: KeyServiceHandlers,
    config: GatewayConfig,
    listen: str,
    *,
    reuse_port: bool = False,
    shutdown_grace: float = 10.0,
    idle_timeout: float = 60.0,
) -> tuple[web.AppRunner, int]:
    """Serve ``/auth`` on ``listen`` (host:port); returns the runner (to ``cleanup``) and the port.

    ``cleanup`` lets requests in flight finish within ``shutdown_grace`` seconds (--shutdown-grace,
    as gRPC calls get), then cancels them: aiohttp's own default would wait a minute. aiohttp
    spends its timeout twice (waiting for the handler, then for it to end once cancelled), so it
    gets half. A connection with no request in progress, one that never sends one, or one whose
    request stays unfinished (slowloris) is closed after ``idle_timeout`` seconds
    (--max-connection-idle; aiohttp's own default is an hour, nginx's header timeout 60 s).
    """
    app = web.Application()
    app.router.add_route("*", PATH, ForwardAuth(handlers, config).auth)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_grace / 2,
        keepalive_timeout=idle_timeout,
    )
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port or None)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else int(port)
    return runner, int(bound)
