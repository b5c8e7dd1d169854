"""Typed Python clients over the generated stubs: ``Client`` (blocking) and ``AsyncClient``.

Both share the request builders below, apply a default deadline to every call, and raise the
typed exceptions of ``keystile._errors`` instead of raw ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
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


def _wants_tls(tls: bool, *sources: PemSource | None) -> bool:
    return tls or any(source is not None for source in sources)


class Client:
    """Blocking client for keystile.v1.KeyService; use as a context manager or call ``close()``.

    ``api_key`` is sent as ``authorization: Bearer <key>`` on every call. ``tls=True`` (or any of
    ``tls_ca``, ``tls_cert``, ``tls_key``) connects over TLS; the key and cert enable mTLS.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        if channel is None:
            if _wants_tls(tls, tls_ca, tls_cert, tls_key):
                creds = channel_credentials(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._metadata = _call_metadata(api_key)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<keystile.Client timeout={self.timeout}>"

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
    """asyncio client for keystile.v1.KeyService; same options as ``Client``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is None:
            if _wants_tls(tls, tls_ca, tls_cert, tls_key):
                creds = channel_credentials(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
                channel = grpc.aio.secure_channel(target, creds)
            else:
                channel = grpc.aio.insecure_channel(target)
        self._channel = channel
        self._stub = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._metadata = _call_metadata(api_key)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<keystile.AsyncClient timeout={self.timeout}>"

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
