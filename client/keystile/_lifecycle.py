"""The key lifecycle from the clients: UpdateKey, RollKey, DeleteKey, cascading RevokeKey, audit.

``LifecycleMethods`` and ``AsyncLifecycleMethods`` are mixed into ``Client`` and ``AsyncClient``;
the request builders are shared, so both send exactly the same messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from google.protobuf import field_mask_pb2

from .v1 import keys_pb2

KEEP: Final[Any] = object()
"""The default of ``update_key_request``'s fields: leave the field as it is."""


def update_key_request(
    key_id: str,
    *,
    name: str = KEEP,
    scopes: Iterable[str] = KEEP,
    resources: Iterable[str] = KEEP,
    metadata: Mapping[str, Any] = KEEP,
    expire_time: datetime | None = KEEP,
    limits: Iterable[keys_pb2.RateLimit] = KEEP,
    disabled: bool = KEEP,
) -> keys_pb2.UpdateKeyRequest:
    """An UpdateKeyRequest whose mask names exactly the fields given (``expire_time=None``: never)."""
    key = keys_pb2.Key(id=key_id)
    paths: list[str] = []
    if name is not KEEP:
        key.name = name
        paths.append("name")
    if scopes is not KEEP:
        key.scopes.extend(scopes)
        paths.append("scopes")
    if resources is not KEEP:
        key.resources.extend(resources)
        paths.append("resources")
    if metadata is not KEEP:
        key.metadata.update(dict(metadata))
        paths.append("metadata")
    if expire_time is not KEEP:
        if expire_time is not None:
            key.expire_time.FromDatetime(expire_time)
        paths.append("expire_time")
    if limits is not KEEP:
        key.limits.extend(limits)
        paths.append("limits")
    if disabled is not KEEP:
        key.disabled = disabled
        paths.append("disabled")
    return keys_pb2.UpdateKeyRequest(key=key, update_mask=field_mask_pb2.FieldMask(paths=paths))


def roll_key_request(key_id: str, grace_period: timedelta | float | None = None) -> keys_pb2.RollKeyRequest:
    """A RollKeyRequest; ``grace_period`` in seconds or a timedelta (None or 0: the old secret stops now)."""
    request = keys_pb2.RollKeyRequest(id=key_id)
    if grace_period:
        seconds = grace_period if isinstance(grace_period, timedelta) else timedelta(seconds=grace_period)
        request.grace_period.FromTimedelta(seconds)
    return request


def audit_request(
    *,
    owner_id: str = "",
    key_id: str = "",
    actor_key_id: str = "",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> keys_pb2.ListAuditEventsRequest:
    """A ListAuditEventsRequest; every filter given must match."""
    request = keys_pb2.ListAuditEventsRequest(
        owner_id=owner_id,
        key_id=key_id,
        actor_key_id=actor_key_id,
        page_size=page_size,
        page_token=page_token,
    )
    if start_time is not None:
        request.start_time.FromDatetime(start_time)
    if end_time is not None:
        request.end_time.FromDatetime(end_time)
    return request


class LifecycleMethods:
    """``Client``'s lifecycle calls (``_call`` and ``_stub`` are the client's)."""

    _stub: Any

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        raise NotImplementedError

    def update_key(self, key_id: str, *, timeout: float | None = None, **fields: Any) -> keys_pb2.Key:
        """Change the fields given (as ``update_key_request``) and return the key as stored."""
        response: keys_pb2.UpdateKeyResponse = self._call(
            self._stub.UpdateKey, update_key_request(key_id, **fields), timeout
        )
        return response.key

    def roll_key(
        self, key_id: str, *, grace_period: timedelta | float | None = None, timeout: float | None = None
    ) -> keys_pb2.RollKeyResponse:
        """A new secret for the key's grant (``secret``, this once); the old one lasts ``grace_period``."""
        response: keys_pb2.RollKeyResponse = self._call(
            self._stub.RollKey, roll_key_request(key_id, grace_period), timeout
        )
        return response

    def revoke_keys(
        self, key_id: str, *, reason: str = "", timeout: float | None = None
    ) -> keys_pb2.RevokeKeyResponse:
        """Revoke a key and, in the same transaction, every key it created, transitively (cascade)."""
        request = keys_pb2.RevokeKeyRequest(id=key_id, reason=reason, cascade=True)
        response: keys_pb2.RevokeKeyResponse = self._call(self._stub.RevokeKey, request, timeout)
        return response

    def import_keys(
        self, keys: Iterable[keys_pb2.ImportedKey], *, timeout: float | None = None
    ) -> keys_pb2.ImportKeysResponse:
        """Import up to 1000 keys by hash (admin); ``results`` says, per key, imported or why not."""
        request = keys_pb2.ImportKeysRequest(keys=list(keys))
        response: keys_pb2.ImportKeysResponse = self._call(self._stub.ImportKeys, request, timeout)
        return response

    def delete_key(self, key_id: str, *, timeout: float | None = None) -> None:
        """Delete a revoked or expired key for good (its audit events stay)."""
        self._call(self._stub.DeleteKey, keys_pb2.DeleteKeyRequest(id=key_id), timeout)

    def list_audit_events(
        self, *, timeout: float | None = None, **filters: Any
    ) -> keys_pb2.ListAuditEventsResponse:
        """One page of audit events, newest first; filters as ``audit_request``."""
        response: keys_pb2.ListAuditEventsResponse = self._call(
            self._stub.ListAuditEvents, audit_request(**filters), timeout
        )
        return response

    def iter_audit_events(self, **filters: Any) -> Iterator[keys_pb2.AuditEvent]:
        """Every audit event matching the filters, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_audit_events(**filters, page_token=token)
            yield from page.events
            token = page.next_page_token
            if not token:
                return


class AsyncLifecycleMethods:
    """``AsyncClient``'s lifecycle calls."""

    _stub: Any

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        raise NotImplementedError

    async def update_key(self, key_id: str, *, timeout: float | None = None, **fields: Any) -> keys_pb2.Key:
        """Change the fields given (as ``update_key_request``) and return the key as stored."""
        response: keys_pb2.UpdateKeyResponse = await self._call(
            self._stub.UpdateKey, update_key_request(key_id, **fields), timeout
        )
        return response.key

    async def roll_key(
        self, key_id: str, *, grace_period: timedelta | float | None = None, timeout: float | None = None
    ) -> keys_pb2.RollKeyResponse:
        """A new secret for the key's grant (``secret``, this once); the old one lasts ``grace_period``."""
        response: keys_pb2.RollKeyResponse = await self._call(
            self._stub.RollKey, roll_key_request(key_id, grace_period), timeout
        )
        return response

    async def revoke_keys(
        self, key_id: str, *, reason: str = "", timeout: float | None = None
    ) -> keys_pb2.RevokeKeyResponse:
        """Revoke a key and, in the same transaction, every key it created, transitively (cascade)."""
        request = keys_pb2.RevokeKeyRequest(id=key_id, reason=reason, cascade=True)
        response: keys_pb2.RevokeKeyResponse = await self._call(self._stub.RevokeKey, request, timeout)
        return response

    async def import_keys(
        self, keys: Iterable[keys_pb2.ImportedKey], *, timeout: float | None = None
    ) -> keys_pb2.ImportKeysResponse:
        """Import up to 1000 keys by hash (admin); ``results`` says, per key, imported or why not."""
        request = keys_pb2.ImportKeysRequest(keys=list(keys))
        response: keys_pb2.ImportKeysResponse = await self._call(self._stub.ImportKeys, request, timeout)
        return response

    async def delete_key(self, key_id: str, *, timeout: float | None = None) -> None:
        """Delete a revoked or expired key for good (its audit events stay)."""
        await self._call(self._stub.DeleteKey, keys_pb2.DeleteKeyRequest(id=key_id), timeout)

    async def list_audit_events(
        self, *, timeout: float | None = None, **filters: Any
    ) -> keys_pb2.ListAuditEventsResponse:
        """One page of audit events, newest first; filters as ``audit_request``."""
        response: keys_pb2.ListAuditEventsResponse = await self._call(
            self._stub.ListAuditEvents, audit_request(**filters), timeout
        )
        return response

    async def iter_audit_events(self, **filters: Any) -> AsyncIterator[keys_pb2.AuditEvent]:
        """Every audit event matching the filters, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = await self.list_audit_events(**filters, page_token=token)
            for event in page.events:
                yield event
            token = page.next_page_token
            if not token:
                return
