"""Server assembly and lifecycle: gRPC, health, reflection, database, and graceful shutdown.

Start-up binds the port first and reports NOT_SERVING, then connects to PostgreSQL (retrying with
backoff), migrates, opens the pool and only then reports SERVING. A background probe flips health
to NOT_SERVING while the database is unreachable. Shutdown reverses it: NOT_SERVING, let in-flight
calls finish, flush usage, close the pool, release the embedded database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from datetime import timedelta
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keystile.v1 import keys_pb2

from . import ext_authz, forward_auth, reflection
from .cache import VerificationCache
from .connection_limits import FileDescriptorWatch, grpc_server_options, raise_open_file_limit
from .database_health import DatabaseHealth
from .embedded import EmbeddedPostgres
from .errors import KeystileError
from .gateway import GatewayConfig
from .handlers import KeyServiceHandlers, add_to_server
from .key_filter import KeyFilter
from .key_formats import KeyFormats
from .metrics import ServerMetrics
from .metrics_http import METRICS_CLOSE_TIMEOUT, close_metrics_server, start_metrics_server
from .page_tokens import PageTokenCodec
from .processes import STOP_SIGNALS, ignore_stop_signals
from .service import KeyService, utc_now
from .settings import Settings
from .store import KeyStore, migrate
from .store.connections import describe_database_error
from .store.key_events import KeyEventListener
from .store.usage_store import UsageStore
from .usage import UsageRecorder
from .watch import KeyEventHub

_log = logging.getLogger(__name__)

KEY_SERVICE_NAME: Final = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_MAX_BACKOFF: Final = 5.0
RETENTION_INTERVAL: Final = 3600
"""Seconds between purges of dead keys and old audit events (with --key/--audit-retention-days)."""


def gateway_config(settings: Settings) -> GatewayConfig:
    """What gateways' requests are read for, from the ``--auth-*`` settings."""
    return GatewayConfig(
        key_headers=settings.auth_key_headers,
        key_query=settings.auth_key_query,
        header_prefix=settings.auth_header_prefix,
        strip_credential=settings.auth_strip_credential,
    )


def build_cache(
    store: KeyStore, settings: Settings, metrics: ServerMetrics, key_filter: KeyFilter | None = None
) -> VerificationCache:
    """A disarmed verification cache over the store, sized from settings."""
    return VerificationCache(
        store.find_by_hashes,
        max_entries=settings.cache_max_entries,
        negative_max_entries=settings.negative_cache_max_entries,
        max_staleness=settings.max_staleness,
        metrics=metrics,
        max_pending=settings.max_pending_lookups,
        key_filter=key_filter,
    )


async def build_service(
    store: KeyStore,
    settings: Settings,
    usage: UsageRecorder,
    *,
    static_admin_key: str | None,
    metrics: ServerMetrics,
    cache: VerificationCache | None = None,
    events: KeyEventHub | None = None,
) -> KeyService:
    """The domain service over an open store, configured from settings."""
    return KeyService(
        store,
        default_prefix=settings.default_prefix,
        page_tokens=PageTokenCodec(await store.server_secret("page_token_hmac")),
        usage=usage,
        cache=cache if cache is not None else build_cache(store, settings, metrics),
        events=events if events is not None else KeyEventHub(),
        metrics=metrics,
        usage_store=UsageStore(store.guard, on_query=store.count_query),
        verify_auth=settings.verify_auth,
        static_admin_key=static_admin_key,
        max_staleness=timedelta(seconds=settings.max_staleness),
        key_formats=KeyFormats(settings.legacy_key_formats),
    )


class KeystileServer:
    """One keystile server process: ``await start()``, then ``await stop()``.

    ``reuse_port`` lets several worker processes bind the same port (``--workers``); a lone
    server leaves it off so that a port already taken fails loudly. ``serve_metrics`` is off in
    workers, whose supervisor serves the combined ``/metrics``.
    """

    def __init__(self, settings: Settings, *, reuse_port: bool = False, serve_metrics: bool = True) -> None:
        self.settings = settings
        self.port = 0
        self.metrics_port = 0
        self._reuse_port = reuse_port
        self._serve_metrics = serve_metrics
        self.metrics = ServerMetrics()
        self._metrics_http: Any = None
        self._http: Any = None  # the forward-auth server's runner, with --http-listen
        self.http_port = 0
        # A subscriber that cannot take a message for max_staleness is of no use to its cache.
        self._events = KeyEventHub(
            max_subscribers=settings.max_watchers, stall_timeout=settings.max_staleness
        )
        self._fd_watch = FileDescriptorWatch()
        self._cache: VerificationCache | None = None
        self._filter: KeyFilter | None = None
        self._handlers = KeyServiceHandlers()
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._grpc: grpc.aio.Server | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._store: KeyStore | None = None
        self._usage: UsageRecorder | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._database_health: DatabaseHealth | None = None
        self._database_url = settings.database_url
        # Read once at construction, so a missing or short key file fails before anything starts.
        self._static_admin_key = settings.static_admin_key()
        for warning in settings.exposed_secret_files():
            _log.warning("%s", warning)

    async def start(self) -> None:
        """Bind the port and begin connecting to the database in the background."""
        if self._database_url is None:
            self._embedded = EmbeddedPostgres(self.settings.data_dir)
            self._database_url = await asyncio.to_thread(self._embedded.start)
        raise_open_file_limit()
        server = grpc.aio.server(options=grpc_server_options(self.settings, reuse_port=self._reuse_port))
        add_to_server(self._handlers, server)
        ext_authz.add_to_server(self._handlers, server, gateway_config(self.settings))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.add_to_server([KEY_SERVICE_NAME, ext_authz.SERVICE_NAME, health.SERVICE_NAME], server)
        for name in ("", KEY_SERVICE_NAME):
            await self._health.set(name, _NOT_SERVING)
        try:
            credentials = self._tls_credentials()
            if credentials is None:
                self.port = server.add_insecure_port(self.settings.listen)
            else:
                self.port = server.add_secure_port(self.settings.listen, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.settings.listen}: {exc}") from exc
        await server.start()
        self._grpc = server
        _log.info("listening on %s", self.address)
        if self._serve_metrics and self.settings.metrics_listen:
            self._metrics_http, self.metrics_port = start_metrics_server(
                self.settings.metrics_listen, self.metrics.registry
            )
        if self.settings.http_listen:
            try:
                self._http, self.http_port = await forward_auth.start(
                    self._handlers,
                    gateway_config(self.settings),
                    self.settings.http_listen,
                    reuse_port=self._reuse_port,
                    shutdown_grace=self.settings.shutdown_grace,
                    idle_timeout=self.settings.max_connection_idle,
                )
            except OSError as exc:
                raise OSError(f"cannot listen on {self.settings.http_listen}: {exc.strerror}") from exc
            _log.info("forward-auth on http://%s%s", self.settings.http_listen, forward_auth.PATH)
        self._tasks.append(asyncio.create_task(self._connect(), name="keystile-connect"))

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        """TLS from --tls-cert/--tls-key; with --tls-client-ca, client certificates are required."""
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    @property
    def address(self) -> str:
        """host:port actually bound (the port is resolved when 0 was asked for)."""
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the database is connected and the server reports SERVING."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    async def _connect(self) -> None:
        assert self._database_url is not None
        delay = 0.2
        while True:
            try:
                applied = await migrate(self._database_url)
                if applied:
                    _log.info("schema migrated to version %d", applied[-1])
                pool = KeyStore.create_pool(
                    self._database_url,
                    min_size=self.settings.pool_min_size,
                    max_size=self.settings.pool_max_size,
                    timeout=self.settings.db_timeout,
                )
                try:
                    await pool.open(wait=True, timeout=self.settings.db_timeout)
                except BaseException:
                    await pool.close()
                    raise
                break
            except Exception as exc:  # the database is not there yet: keep trying, stay NOT_SERVING
                _log.warning("database not ready: %s; retrying in %.1fs", describe_database_error(exc), delay)
                _log.debug("database connection error", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        store = KeyStore(pool, on_query=self.metrics.count_query, on_outage=self._database_outage)
        self._store = store
        self._usage = UsageRecorder(store, flush_interval=self.settings.usage_flush_interval)
        self._filter = KeyFilter(store.count_keys, store.hash_page) if self.settings.key_filter else None
        cache = self._cache = build_cache(store, self.settings, self.metrics, self._filter)
        cache.disarm()
        self._handlers.service = await build_service(
            store,
            self.settings,
            self._usage,
            static_admin_key=self._static_admin_key,
            metrics=self.metrics,
            cache=cache,
            events=self._events,
        )
        listener = KeyEventListener(
            self._database_url,
            on_event=self._key_changed,
            on_connected=self._events_flowing,
            on_disconnected=self._events_lost,
            ping_interval=self.settings.health_check_interval,
            timeout=self.settings.db_timeout,
        )
        self._tasks.append(asyncio.create_task(listener.run(), name="keystile-listener"))
        self._tasks.append(asyncio.create_task(self._usage.run(), name="keystile-usage"))
        self._database_health = DatabaseHealth(
            store,
            interval=self.settings.health_check_interval,
            db_timeout=self.settings.db_timeout,
            set_serving=self._set_serving,
            housekeeping=self._housekeeping,
        )
        self._tasks.append(asyncio.create_task(self._database_health.run(), name="keystile-health"))
        if self.settings.key_retention_days or self.settings.audit_retention_days:
            self._tasks.append(asyncio.create_task(self._retention(), name="keystile-retention"))
        await self._set_serving(True)
        self._ready.set()
        _log.info("ready: database connected, serving")

    async def _retention(self) -> None:
        """Purge dead keys and old audit events at start, then every RETENTION_INTERVAL seconds.

        Every worker runs it; concurrent purges skip each other's rows. A failure (the database
        is down) is logged and retried at the next interval.
        """
        service = self._handlers.service
        assert service is not None
        keys, events = self.settings.key_retention_days, self.settings.audit_retention_days
        while True:
            try:
                if keys:
                    await service.lifecycle.purge(timedelta(days=keys))
                if events:
                    await service.audit.purge(timedelta(days=events), utc_now())
            except KeystileError as exc:
                _log.warning("retention: %s; trying again in %d s", exc.message, RETENTION_INTERVAL)
            await asyncio.sleep(RETENTION_INTERVAL)

    def _key_changed(self, secret_hash: bytes, lag: float) -> None:
        assert self._cache is not None
        if self._filter is not None:  # before the cache: a created key must never be filtered out
            self._filter.add(secret_hash)
        self._cache.invalidate(secret_hash)
        self._key_service().allowances.drop(secret_hash)
        self._events.publish(secret_hash)
        self.metrics.key_events.inc()
        self.metrics.key_event_lag.observe(lag)

    def _events_flowing(self) -> None:
        assert self._cache is not None
        if self._filter is not None:
            self._filter.start()
        self._cache.arm()
        self._key_service().allowances.clear()
        self._events.open()

    def _events_lost(self) -> None:
        assert self._cache is not None
        if self._filter is not None:
            self._filter.stop()
        self._events.close_all("listener disconnected")
        # Leased units stay spendable (they are the database's grant, whatever happens next);
        # they are dropped when events flow again, as changes may have been missed meanwhile.
        if self.settings.on_database_outage == "serve-cached":
            self._cache.hold()
            _log.warning(
                "key events lost: serving cached verdicts (up to --max-staleness %gs old) until reconnected",
                self.settings.max_staleness,
            )
        else:
            self._cache.disarm()
            _log.warning("key events lost: cache bypassed and watch streams closed until reconnected")

    def _key_service(self) -> KeyService:
        service = self._handlers.service
        assert service is not None  # the listener starts after the service is attached
        return service

    async def _set_serving(self, serving: bool) -> None:
        for name in ("", KEY_SERVICE_NAME):
            await self._health.set(name, _SERVING if serving else _NOT_SERVING)

    def _database_outage(self, cause: str) -> None:
        if self._database_health is not None:
            self._database_health.outage(cause)

    def _housekeeping(self) -> None:
        """Once per health interval: publish gauges and counters, watch open files."""
        if self._cache is not None:
            self._cache.report_size()
        if self._filter is not None:
            self.metrics.key_filter_ready.set(int(self._filter.ready))
            self.metrics.key_filter_keys.set(self._filter.keys)
            self.metrics.key_filter_bytes.set(self._filter.size_bytes)
            self.metrics.key_filter_load_seconds.set(self._filter.load_seconds)
        self.metrics.publish()
        self.metrics.watchers.set(len(self._events))
        self._fd_watch.check()

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, drain calls, flush, close the pool, stop the database.

        Bounded even when the database hangs: calls in flight (gRPC and forward-auth, drained
        together) get ``--shutdown-grace`` and are then cancelled, the last usage flush gets as
        long again, and the pool ``POOL_CLOSE_WAIT``.
        """
        grace = self.settings.shutdown_grace
        await self._health.enter_graceful_shutdown()
        # Watch streams never end on their own: close them so that draining is not held up.
        self._events.close_all("server shutting down")
        draining = [self._http.cleanup()] if self._http is not None else []
        if self._grpc is not None:
            draining.append(self._grpc.stop(grace))
        await asyncio.gather(*draining)
        if self._filter is not None:
            self._filter.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._usage is not None:
            try:
                async with asyncio.timeout(grace):
                    await self._usage.flush()
            except TimeoutError:
                _log.warning("last_used_time not flushed: the database did not answer in %gs", grace)
        self.metrics.publish()
        if self._store is not None:  # it owns the pool (an outage may have replaced the first)
            await self._store.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        if self._metrics_http is not None:
            loop, closed = asyncio.get_running_loop(), asyncio.Event()
            close_metrics_server(self._metrics_http, lambda: loop.call_soon_threadsafe(closed.set))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(METRICS_CLOSE_TIMEOUT):
                    await closed.wait()
        _log.info("stopped")


async def serve(settings: Settings, *, reuse_port: bool = False, serve_metrics: bool = True) -> None:
    """Run a server until SIGINT or SIGTERM, then shut down gracefully."""
    server = KeystileServer(settings, reuse_port=reuse_port, serve_metrics=serve_metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # Start-up objects (modules, descriptors, the pool) live for good: once ready, keep them out
    # of the collector's generations so collections on the request path walk less.
    freeze = asyncio.create_task(server.wait_ready())
    freeze.add_done_callback(lambda task: None if task.cancelled() else gc.freeze())
    try:
        await server.start()
        await stop.wait()
        _log.info("shutting down")
    finally:
        freeze.cancel()
        await server.stop()
        # Stopped; closing the loop would restore the default disposition for these.
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        ignore_stop_signals()
