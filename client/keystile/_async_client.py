"""``AsyncClient``: the asyncio twin of ``Client``, sharing its request builders and cache rules.

With ``cache=True`` a task keeps the WatchKeyEvents subscription (started by the first
``verify_key``); everything else mirrors ``_client.Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Self, Unpack

import grpc

from ._cache import SILENCE_FACTOR, CacheStats, VerdictCache, apply_event
from ._client import (
    _EOF,
    _RETRY,
    _WATCH_REQUEST,
    DEFAULT_CACHE_ENTRIES,
    DEFAULT_MAX_STALENESS,
    DEFAULT_TIMEOUT,
    WATCH_HEARTBEAT,
    CreateKeyOptions,
    PemSource,
    _call_metadata,
    _log,
    _timeout,
    _wants_tls,
    channel_credentials,
    create_key_request,
    resolve_api_key,
    resolve_target,
    verify_request,
)
from ._errors import from_rpc_error
from ._lifecycle import AsyncLifecycleMethods
from ._limits import update_credits_request
from .v1 import keys_pb2, keys_pb2_grpc


class AsyncClient(AsyncLifecycleMethods):
    """asyncio client for keystile.v1.KeyService; same options as ``Client``.

    With ``cache=True`` the subscription task starts with the first ``verify_key`` call.
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
        channel: grpc.aio.Channel | None = None,
        cache: bool = False,
        cache_max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_staleness: float = DEFAULT_MAX_STALENESS,
    ) -> None:
        target = resolve_target(target)
        if channel is None:
            if _wants_tls(tls, tls_ca, tls_cert, tls_key):
                creds = channel_credentials(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
                channel = grpc.aio.secure_channel(target, creds)
            else:
                channel = grpc.aio.insecure_channel(target)
        self._channel = channel
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._metadata = _call_metadata(resolve_api_key(api_key))
        self.timeout = timeout
        self._cache = (
            VerdictCache(max_entries=cache_max_entries, max_staleness=max_staleness) if cache else None
        )
        self._watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<keystile.AsyncClient timeout={self.timeout} cache={self._cache is not None}>"

    async def _watch(self) -> None:
        """Keep a WatchKeyEvents subscription open, feeding the cache, until cancelled."""
        assert self._cache is not None
        delay = _RETRY[0]
        while True:
            call: Any = self._stub.WatchKeyEvents(_WATCH_REQUEST, metadata=self._metadata)
            try:
                while True:
                    # A stream silent for three heartbeats is abandoned, not trusted. (Not
                    # wait_for: on Python 3.11 it can swallow the cancellation close() sends.)
                    async with asyncio.timeout(SILENCE_FACTOR * WATCH_HEARTBEAT):
                        event = await call.read()
                    if event is _EOF or not apply_event(self._cache, event):
                        break
                    delay = _RETRY[0]
            except (grpc.RpcError, TimeoutError) as exc:
                _log.debug("key event stream ended: %r", exc)
            except Exception:  # never let the watcher die: the cache would stay off for good
                _log.warning("key event stream failed", exc_info=True)
            finally:
                self._cache.broken()
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY[1])

    def cache_stats(self) -> CacheStats | None:
        """The verdict cache's counters, or None without ``cache=True``."""
        return self._cache.stats() if self._cache is not None else None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the event subscription (if any) and close the channel."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._channel.close(None)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=_timeout(timeout, self.timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def create_key(
        self, owner_id: str, name: str, *, timeout: float | None = None, **options: Unpack[CreateKeyOptions]
    ) -> keys_pb2.CreateKeyResponse:
        """Create a key; the response's ``secret`` is shown this once. Options as ``create_key_request``."""
        response: keys_pb2.CreateKeyResponse = await self._call(
            self._stub.CreateKey, create_key_request(owner_id, name, **options), timeout
        )
        return response

    async def get_key(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.Key:
        """One key by id."""
        response: keys_pb2.GetKeyResponse = await self._call(
            self._stub.GetKey, keys_pb2.GetKeyRequest(id=key_id), timeout
        )
        return response.key

    async def list_keys(
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
        response: keys_pb2.ListKeysResponse = await self._call(self._stub.ListKeys, request, timeout)
        return response

    async def iter_keys(
        self,
        owner_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        created_by: str = "",
        secret_hint: str = "",
    ) -> AsyncIterator[keys_pb2.Key]:
        """Every key of an owner (an admin's "": of every owner), fetching pages as needed."""
        token = ""
        while True:
            page = await self.list_keys(
                owner_id,
                page_size=page_size,
                page_token=token,
                include_inactive=include_inactive,
                created_by=created_by,
                secret_hint=secret_hint,
            )
            for key in page.keys:
                yield key
            token = page.next_page_token
            if not token:
                return

    async def revoke_key(
        self, key_id: str, *, reason: str = "", timeout: float | None = None
    ) -> keys_pb2.Key:
        """Revoke a key (idempotent) and return it."""
        response: keys_pb2.RevokeKeyResponse = await self._call(
            self._stub.RevokeKey, keys_pb2.RevokeKeyRequest(id=key_id, reason=reason), timeout
        )
        return response.key

    async def set_owner_policy(
        self, policy: keys_pb2.OwnerPolicy, *, timeout: float | None = None
    ) -> keys_pb2.OwnerPolicy:
        """Replace an owner's policy (admin only); build it with ``keystile.owner_policy``."""
        response: keys_pb2.SetOwnerPolicyResponse = await self._call(
            self._stub.SetOwnerPolicy, keys_pb2.SetOwnerPolicyRequest(policy=policy), timeout
        )
        return response.policy

    async def get_owner_policy(self, owner_id: str, *, timeout: float | None = None) -> keys_pb2.OwnerPolicy:
        """An owner's policy; NotFoundError when it has none."""
        response: keys_pb2.GetOwnerPolicyResponse = await self._call(
            self._stub.GetOwnerPolicy, keys_pb2.GetOwnerPolicyRequest(owner_id=owner_id), timeout
        )
        return response.policy

    async def delete_owner_policy(self, owner_id: str, *, timeout: float | None = None) -> None:
        """Remove an owner's policy (admin only; idempotent)."""
        await self._call(
            self._stub.DeleteOwnerPolicy, keys_pb2.DeleteOwnerPolicyRequest(owner_id=owner_id), timeout
        )

    async def get_credits(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.Credits:
        """A key's credits, ``remaining`` being the balance neither spent nor leased."""
        response: keys_pb2.GetCreditsResponse = await self._call(
            self._stub.GetCredits, keys_pb2.GetCreditsRequest(id=key_id), timeout
        )
        return response.credits

    async def update_credits(
        self, key_id: str, *, set_to: int | None = None, add: int | None = None, timeout: float | None = None
    ) -> keys_pb2.Credits:
        """Set a key's balance, or add to it (admin only)."""
        response: keys_pb2.UpdateCreditsResponse = await self._call(
            self._stub.UpdateCredits, update_credits_request(key_id, set_to=set_to, add=add), timeout
        )
        return response.credits

    async def verify_key(
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
            return await self._verify(key, required_scopes, resource, timeout, cost)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="keystile-watch")
        answer, pending, lease = cache.answer(key, required_scopes, resource, cost)
        if answer is not None:
            return answer
        response = await self._verify(key, pending.scopes, resource, timeout, cost, lease)
        cache.store(pending, response)
        return response

    async def _verify(
        self,
        key: str,
        required_scopes: Iterable[str],
        resource: str,
        timeout: float | None,
        cost: int = 0,
        lease_units: int = 0,
    ) -> keys_pb2.VerifyKeyResponse:
        request = verify_request(key, required_scopes, resource, cost, lease_units)
        response: keys_pb2.VerifyKeyResponse = await self._call(self._stub.VerifyKey, request, timeout)
        return response
