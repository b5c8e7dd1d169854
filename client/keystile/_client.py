"""Typed Python clients over the generated stubs: ``Client`` here, ``AsyncClient`` beside it.

Both share the request builders below, apply a default deadline to every call, and raise the
typed exceptions of ``keystile._errors`` instead of raw ``grpc.RpcError``. With ``cache=True``
both keep a ``VerdictCache`` fed by a WatchKeyEvents subscription (a daemon thread for
``Client``, a task for ``AsyncClient``) and answer repeated verifications without an RPC.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypedDict, Unpack

import grpc

from ._cache import CacheStats, VerdictCache, apply_event
from ._errors import from_rpc_error
from ._lifecycle import LifecycleMethods
from ._limits import update_credits_request
from .v1 import keys_pb2, keys_pb2_grpc

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_CACHE_ENTRIES: Final = 10_000
DEFAULT_MAX_STALENESS: Final = 30.0
WATCH_HEARTBEAT: Final = 2.0
"""Heartbeat interval the caching clients ask for: a dead stream is noticed within 3x this."""
_RETRY: Final = (0.1, 5.0)

_log = logging.getLogger("keystile")
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]
_WATCH_REQUEST: Final = keys_pb2.WatchKeyEventsRequest()
_WATCH_REQUEST.heartbeat_interval.FromTimedelta(timedelta(seconds=WATCH_HEARTBEAT))


class CreateKeyOptions(TypedDict, total=False):
    """Optional CreateKey fields, shared by ``create_key_request`` and both clients' ``create_key``."""

    scopes: Iterable[str]
    resources: Iterable[str]
    prefix: str
    ttl: timedelta | float | None
    expire_time: datetime | None
    rate_limit_per_minute: int
    metadata: Mapping[str, Any] | None
    limits: Iterable[keys_pb2.RateLimit]
    credits: keys_pb2.Credits | int | None
    secret_hash: bytes | str
    secret_hint: str


def create_key_request(
    owner_id: str,
    name: str,
    *,
    scopes: Iterable[str] = (),
    resources: Iterable[str] = (),
    prefix: str = "",
    ttl: timedelta | float | None = None,
    expire_time: datetime | None = None,
    rate_limit_per_minute: int = 0,
    metadata: Mapping[str, Any] | None = None,
    limits: Iterable[keys_pb2.RateLimit] = (),
    credits: keys_pb2.Credits | int | None = None,
    secret_hash: bytes | str = "",
    secret_hint: str = "",
) -> keys_pb2.CreateKeyRequest:
    """Build a CreateKeyRequest; ``ttl`` in seconds or as a timedelta, at most one of ttl/expire_time.

    ``limits`` come from ``keystile.rate_limit``; ``credits`` is a starting balance or a message
    from ``keystile.credits`` (with a refill). ``secret_hash`` (the digest of a secret minted by
    the caller, e.g. ``keystile.hash_key(keystile.generate_key("ks"))``, with its ``secret_hint``)
    stores that secret instead of minting one: the response then carries no secret.
    """
    if ttl is not None and expire_time is not None:
        raise ValueError("give ttl or expire_time, not both")
    request = keys_pb2.CreateKeyRequest(
        owner_id=owner_id,
        name=name,
        scopes=list(scopes),
        resources=list(resources),
        prefix=prefix,
        rate_limit_per_minute=rate_limit_per_minute,
        limits=list(limits),
        secret_hash=secret_hash.hex() if isinstance(secret_hash, bytes) else secret_hash,
        secret_hint=secret_hint,
    )
    if credits is not None:
        request.credits.CopyFrom(
            credits if isinstance(credits, keys_pb2.Credits) else keys_pb2.Credits(remaining=credits)
        )
    if ttl is not None:
        request.ttl.FromTimedelta(ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl))
    if expire_time is not None:
        request.expire_time.FromDatetime(
            expire_time if expire_time.tzinfo else expire_time.replace(tzinfo=UTC)
        )
    if metadata:
        request.metadata.update(dict(metadata))
    return request


def verify_request(
    key: str, required_scopes: Iterable[str], resource: str, cost: int = 0, lease_units: int = 0
) -> keys_pb2.VerifyKeyRequest:
    """A VerifyKeyRequest (``lease_units``: what a caching client asks to spend from memory)."""
    return keys_pb2.VerifyKeyRequest(
        key=key, required_scopes=list(required_scopes), resource=resource, cost=cost, lease_units=lease_units
    )


def _timeout(timeout: float | None, default: float) -> float:
    return default if timeout is None else timeout


PemSource = str | Path | bytes
"""PEM data as bytes, or the path of a file holding it."""


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_credentials(
    *, tls_ca: PemSource | None = None, tls_cert: PemSource | None = None, tls_key: PemSource | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` to trust (system roots when None), ``tls_cert``/``tls_key`` for mTLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
    )


def _call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def resolve_target(target: str | None) -> str:
    """The target given, else ``KEYSTILE_TARGET``, else ``DEFAULT_TARGET``."""
    return target or os.environ.get("KEYSTILE_TARGET") or DEFAULT_TARGET


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given ("" for none), else ``KEYSTILE_API_KEY`` (what the CLI reads too), else none."""
    if api_key is None:
        return os.environ.get("KEYSTILE_API_KEY") or None
    return api_key or None


def _wants_tls(tls: bool, *sources: PemSource | None) -> bool:
    return tls or any(source is not None for source in sources)


class Client(LifecycleMethods):
    """Blocking client for keystile.v1.KeyService; use as a context manager or call ``close()``.

    ``api_key`` is sent as ``authorization: Bearer <key>`` on every call. Left out, ``target``
    and ``api_key`` come from ``KEYSTILE_TARGET`` and ``KEYSTILE_API_KEY`` (``api_key=""``: no
    key). ``tls=True`` (or any of ``tls_ca``, ``tls_cert``, ``tls_key``) connects over TLS; the
    key and cert enable mTLS.

    ``cache=True`` answers repeated ``verify_key`` calls from memory while a WatchKeyEvents
    stream is healthy, and from the server otherwise (docs/CACHING.md). Up to
    ``cache_max_entries`` verdicts are kept, none older than ``max_staleness`` seconds (or the
    server's bound, if smaller). Cached responses are shared objects: do not modify them.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        channel: grpc.Channel | None = None,
        cache: bool = False,
        cache_max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_staleness: float = DEFAULT_MAX_STALENESS,
    ) -> None:
        target = resolve_target(target)
        if channel is None:
            if _wants_tls(tls, tls_ca, tls_cert, tls_key):
                creds = channel_credentials(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._metadata = _call_metadata(resolve_api_key(api_key))
        self.timeout = timeout
        self._cache = (
            VerdictCache(max_entries=cache_max_entries, max_staleness=max_staleness) if cache else None
        )
        self._closing = threading.Event()
        self._watch_call: Any = None
        self._watcher: threading.Thread | None = None
        if self._cache is not None:
            self._cache.on_silence = self._abandon_stream
            self._watcher = threading.Thread(target=self._watch, name="keystile-watch", daemon=True)
            self._watcher.start()

    def __repr__(self) -> str:
        return f"<keystile.Client timeout={self.timeout} cache={self._cache is not None}>"

    def _watch(self) -> None:
        """Keep a WatchKeyEvents subscription open, feeding the cache, until ``close()``."""
        assert self._cache is not None
        delay = _RETRY[0]
        while not self._closing.is_set():
            call: Any = self._stub.WatchKeyEvents(_WATCH_REQUEST, metadata=self._metadata)
            self._watch_call = call
            try:
                for event in call:
                    if not apply_event(self._cache, event):
                        break
                    delay = _RETRY[0]
            except grpc.RpcError as exc:
                _log.debug("key event stream ended: %s", exc.code())
            except Exception:  # never let the watcher die: the cache would stay off for good
                _log.warning("key event stream failed", exc_info=True)
            finally:
                self._cache.broken()
                call.cancel()
            self._closing.wait(delay)
            delay = min(delay * 2, _RETRY[1])

    def _abandon_stream(self) -> None:
        call = self._watch_call
        if call is not None:
            call.cancel()

    def cache_stats(self) -> CacheStats | None:
        """The verdict cache's counters, or None without ``cache=True``."""
        return self._cache.stats() if self._cache is not None else None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the event subscription (if any) and close the channel."""
        self._closing.set()
        self._abandon_stream()
        self._channel.close()
        if self._watcher is not None:
            self._watcher.join(5)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=_timeout(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def create_key(
        self, owner_id: str, name: str, *, timeout: float | None = None, **options: Unpack[CreateKeyOptions]
    ) -> keys_pb2.CreateKeyResponse:
        """Create a key; the response's ``secret`` is shown this once. Options as ``create_key_request``."""
        response: keys_pb2.CreateKeyResponse = self._call(
            self._stub.CreateKey, create_key_request(owner_id, name, **options), timeout
        )
        return response

    def get_key(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.Key:
        """One key by id."""
        response: keys_pb2.GetKeyResponse = self._call(
            self._stub.GetKey, keys_pb2.GetKeyRequest(id=key_id), timeout
        )
        return response.key

    def list_keys(
        self,
        owner_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        include_inactive: bool = False,
        created_by: str = "",
        secret_hint: str = "",
        timeout: float | None = None,
    ) -> keys_pb2.ListKeysResponse:
        """One page of an owner's keys (an admin's "": every owner's), newest first.

        ``created_by`` (a key id) and ``secret_hint`` (as a log line shows a key) narrow the page.
        """
        request = keys_pb2.ListKeysRequest(
            owner_id=owner_id, page_size=page_size, page_token=page_token, include_inactive=include_inactive
        )
        request.created_by, request.secret_hint = created_by, secret_hint
        response: keys_pb2.ListKeysResponse = self._call(self._stub.ListKeys, request, timeout)
        return response

    def iter_keys(
        self,
        owner_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        created_by: str = "",
        secret_hint: str = "",
    ) -> Iterator[keys_pb2.Key]:
        """Every key of an owner (an admin's "": of every owner), fetching pages as needed."""
        token = ""
        while True:
            page = self.list_keys(
                owner_id,
                page_size=page_size,
                page_token=token,
                include_inactive=include_inactive,
                created_by=created_by,
                secret_hint=secret_hint,
            )
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def revoke_key(self, key_id: str, *, reason: str = "", timeout: float | None = None) -> keys_pb2.Key:
        """Revoke a key (idempotent) and return it."""
        response: keys_pb2.RevokeKeyResponse = self._call(
            self._stub.RevokeKey, keys_pb2.RevokeKeyRequest(id=key_id, reason=reason), timeout
        )
        return response.key

    def set_owner_policy(
        self, policy: keys_pb2.OwnerPolicy, *, timeout: float | None = None
    ) -> keys_pb2.OwnerPolicy:
        """Replace an owner's policy (admin only); build it with ``keystile.owner_policy``."""
        response: keys_pb2.SetOwnerPolicyResponse = self._call(
            self._stub.SetOwnerPolicy, keys_pb2.SetOwnerPolicyRequest(policy=policy), timeout
        )
        return response.policy

    def get_owner_policy(self, owner_id: str, *, timeout: float | None = None) -> keys_pb2.OwnerPolicy:
        """An owner's policy; NotFoundError when it has none."""
        response: keys_pb2.GetOwnerPolicyResponse = self._call(
            self._stub.GetOwnerPolicy, keys_pb2.GetOwnerPolicyRequest(owner_id=owner_id), timeout
        )
        return response.policy

    def delete_owner_policy(self, owner_id: str, *, timeout: float | None = None) -> None:
        """Remove an owner's policy (admin only; idempotent)."""
        self._call(
            self._stub.DeleteOwnerPolicy, keys_pb2.DeleteOwnerPolicyRequest(owner_id=owner_id), timeout
        )

    def get_credits(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.Credits:
        """A key's credits, ``remaining`` being the balance neither spent nor leased."""
        response: keys_pb2.GetCreditsResponse = self._call(
            self._stub.GetCredits, keys_pb2.GetCreditsRequest(id=key_id), timeout
        )
        return response.credits

    def update_credits(
        self, key_id: str, *, set_to: int | None = None, add: int | None = None, timeout: float | None = None
    ) -> keys_pb2.Credits:
        """Set a key's balance, or add to it (admin only)."""
        response: keys_pb2.UpdateCreditsResponse = self._call(
            self._stub.UpdateCredits, update_credits_request(key_id, set_to=set_to, add=add), timeout
        )
        return response.credits

    def verify_key(
        self,
        key: str,
        *,
        required_scopes: Iterable[str] = (),
        resource: str = "",
        cost: int = 0,
        timeout: float | None = None,
    ) -> keys_pb2.VerifyKeyResponse:
        """The verdict on a presented key; a refusal is a result code, not an exception.

        ``cost`` is how many units of the key's limits and credits a VALID answer spends (0: 1).
        """
        cache = self._cache
        if cache is None:
            return self._verify(key, required_scopes, resource, timeout, cost)
        answer, pending, lease = cache.answer(key, required_scopes, resource, cost)
        if answer is not None:
            return answer
        response = self._verify(key, pending.scopes, resource, timeout, cost, lease)
        cache.store(pending, response)
        return response

    def _verify(
        self,
        key: str,
        required_scopes: Iterable[str],
        resource: str,
        timeout: float | None,
        cost: int = 0,
        lease_units: int = 0,
    ) -> keys_pb2.VerifyKeyResponse:
        request = verify_request(key, required_scopes, resource, cost, lease_units)
        response: keys_pb2.VerifyKeyResponse = self._call(self._stub.VerifyKey, request, timeout)
        return response
