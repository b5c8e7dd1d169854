"""Opaque, tamper-evident page tokens for ListKeys keyset pagination.

A token names the last key of the previous page, (create_time, id), plus the listing it belongs
to (owner and filter), signed with a server-wide HMAC key that every server process reads from the
database. A client cannot edit a token to skip into another owner's listing, and a token replayed
against a different request is rejected rather than silently misread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any, Final

from .errors import InvalidPageToken
from .model import PageCursor

_MAC_BYTES: Final = 16


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokenCodec:
    """Signs cursors into tokens and checks tokens back into cursors."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("page token key is too short")
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, cursor: PageCursor, *, owner_id: str, include_inactive: bool, filters: str = "") -> str:
        """A token for the page after ``cursor`` in this owner's listing with these filters."""
        payload = json.dumps(
            {
                "o": owner_id,
                "a": include_inactive,
                "f": filters,
                "t": cursor.create_time.isoformat(),
                "k": cursor.id,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        return f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"

    def encode_id(self, last_id: int, scope: str) -> str:
        """A token for the page after the row numbered ``last_id`` in the listing ``scope`` names."""
        payload = json.dumps({"s": scope, "i": last_id}, separators=(",", ":")).encode("utf-8")
        return f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"

    def decode_id(self, token: str, scope: str) -> int:
        """The row number inside ``token``; InvalidPageToken unless it was issued for ``scope``."""
        try:
            fields = self._open(token)
            if fields["s"] != scope or not isinstance(fields["i"], int):
                raise InvalidPageToken()
            return int(fields["i"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise InvalidPageToken() from exc

    def _open(self, token: str) -> dict[str, Any]:
        """A token's signed fields (InvalidPageToken when it was altered or not ours)."""
        payload_text, mac_text = token.split(".")
        payload = _b64decode(payload_text)
        # Compare canonical text, not decoded bytes: base64 tolerates edits to its padding bits,
        # and a token that was edited at all should be refused.
        expected = _b64encode(self._mac(payload))
        if not hmac.compare_digest(expected, mac_text) or _b64encode(payload) != payload_text:
            raise InvalidPageToken()
        fields: dict[str, Any] = json.loads(payload)
        return fields

    def decode(self, token: str, *, owner_id: str, include_inactive: bool, filters: str = "") -> PageCursor:
        """The cursor inside ``token``; InvalidPageToken unless it was issued for this listing."""
        try:
            fields = self._open(token)
            if fields["o"] != owner_id or fields["a"] is not include_inactive or fields["f"] != filters:
                raise InvalidPageToken()
            create_time = datetime.fromisoformat(fields["t"])
            return PageCursor(create_time=create_time, id=str(fields["k"]))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise InvalidPageToken() from exc
