"""Typed Python clients over the generated stubs: ``Client`` (blocking) and ``AsyncClient``.

Both share the request builders below, apply a default deadline to every call, and raise the
typed exceptions of ``keystile._errors`` instead of raw ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self, TypedDict, Unpack

import grpc

from ._errors import from_rpc_error
from .v1 import keys_pb2, keys_pb2_grpc

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT: Final = 5.0


class CreateKeyOptions(TypedDict, total=False):
    """Optional CreateKey fields, shared by ``create_key_request`` and both clients' ``create_key``."""

    scopes: Iterable[str]
    resources: Iterable[str]
    prefix: str
    ttl: timedelta | float | None
    expire_time: datetime | None
    rate_limit_per_minute: int
    metadata: Mapping[str, Any] | None


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
) -> keys_pb2.CreateKeyRequest:
    """Build a CreateKeyRequest; ``ttl`` in seconds or as a timedelta, at most one of ttl/expire_time."""
    if ttl is not None and expire_time is not None:
        raise ValueError("give ttl or expire_time, not both")
    request = keys_pb2.CreateKeyRequest(
        owner_id=owner_id,
        name=name,
        scopes=list(scopes),
        resources=list(resources),
        prefix=prefix,
        rate_limit_per_minute=rate_limit_per_minute,
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


def _timeout(timeout: float | None, default: float) -> float:
    return default if timeout is None else timeout


class Client:
    """Blocking client for keystile.v1.KeyService; use as a context manager or call ``close()``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=_timeout(timeout, self.timeout))
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
        timeout: float | None = None,
    ) -> keys_pb2.ListKeysResponse:
        """One page of an owner's keys, newest first."""
        request = keys_pb2.ListKeysRequest(
            owner_id=owner_id, page_size=page_size, page_token=page_token, include_inactive=include_inactive
        )
        response: keys_pb2.ListKeysResponse = self._call(self._stub.ListKeys, request, timeout)
        return response

    def iter_keys(
        self, owner_id: str, *, include_inactive: bool = False, page_size: int = 0
    ) -> Iterator[keys_pb2.Key]:
        """Every key of an owner, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_keys(
                owner_id, page_size=page_size, page_token=token, include_inactive=include_inactive
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

    def verify_key(
        self,
        key: str,
        *,
        required_scopes: Iterable[str] = (),
        resource: str = "",
        timeout: float | None = None,
    ) -> keys_pb2.VerifyKeyResponse:
        """The verdict on a presented key; a refusal is a result code, not an exception."""
        request = keys_pb2.VerifyKeyRequest(key=key, required_scopes=list(required_scopes), resource=resource)
        response: keys_pb2.VerifyKeyResponse = self._call(self._stub.VerifyKey, request, timeout)
        return response


class AsyncClient:
    """asyncio client for keystile.v1.KeyService; use as an async context manager or ``await close()``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=_timeout(timeout, self.timeout))
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
        timeout: float | None = None,
    ) -> keys_pb2.ListKeysResponse:
        """One page of an owner's keys, newest first."""
        request = keys_pb2.ListKeysRequest(
            owner_id=owner_id, page_size=page_size, page_token=page_token, include_inactive=include_inactive
        )
        response: keys_pb2.ListKeysResponse = await self._call(self._stub.ListKeys, request, timeout)
        return response

    async def iter_keys(
        self, owner_id: str, *, include_inactive: bool = False, page_size: int = 0
    ) -> AsyncIterator[keys_pb2.Key]:
        """Every key of an owner, fetching pages as needed."""
        token = ""
        while True:
            page = await self.list_keys(
                owner_id, page_size=page_size, page_token=token, include_inactive=include_inactive
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

    async def verify_key(
        self,
        key: str,
        *,
        required_scopes: Iterable[str] = (),
        resource: str = "",
        timeout: float | None = None,
    ) -> keys_pb2.VerifyKeyResponse:
        """The verdict on a presented key; a refusal is a result code, not an exception."""
        request = keys_pb2.VerifyKeyRequest(key=key, required_scopes=list(required_scopes), resource=resource)
        response: keys_pb2.VerifyKeyResponse = await self._call(self._stub.VerifyKey, request, timeout)
        return response
