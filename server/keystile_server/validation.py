"""Request validation: the API contract's rules for each field, in one place.

Every rule collects into a list of field violations rather than raising at the first, so that a
client fixing a request sees every bad field at once. Values come back normalized (trimmed,
de-duplicated) so that what is stored is exactly what was checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
import uuid
from collections.abc import Iterable
from typing import Any, Final

from keystile._format import is_valid_prefix

from .errors import FieldViolation, InvalidArgument

OWNER_ID_RE: Final = re.compile(r"\A[A-Za-z0-9._:@-]{1,128}\Z")
SCOPE_SEGMENT: Final = r"[a-z][a-z0-9_-]*"
SCOPE_RE: Final = re.compile(rf"\A{SCOPE_SEGMENT}(?::{SCOPE_SEGMENT})*(?::\*)?\Z")
ADMIN_SCOPE: Final = "admin"

MAX_NAME_LENGTH: Final = 200
MAX_SCOPE_LENGTH: Final = 64
MAX_SCOPES: Final = 64
MAX_RESOURCE_LENGTH: Final = 256
MAX_RESOURCES: Final = 256
MAX_METADATA_BYTES: Final = 8 * 1024
MAX_REASON_LENGTH: Final = 500
MAX_ID_LENGTH: Final = 128
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500

# Control characters (and line/paragraph separators) would let a name or reason forge log lines.
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})


class Violations:
    """Collects field violations; ``raise_if_any`` turns them into one InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Record that ``field`` is bad, and why."""
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        """Raise InvalidArgument naming every recorded field, if there are any."""
        if self.items:
            raise InvalidArgument(self.items)


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a character that could break a log line or a terminal."""
    return any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in text)


def check_owner_id(owner_id: str, errors: Violations, field: str = "owner_id") -> str:
    """An owner id is 1-128 characters of ``A-Za-z0-9._:@-``."""
    if not owner_id:
        errors.add(field, "is required")
    elif not OWNER_ID_RE.match(owner_id):
        errors.add(field, "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return owner_id


def check_name(name: str, errors: Violations, field: str = "name") -> str:
    """A name is trimmed, then 1-200 characters without control characters."""
    trimmed = name.strip()
    if not trimmed:
        errors.add(field, "is required")
    elif len(trimmed) > MAX_NAME_LENGTH:
        errors.add(field, f"must be at most {MAX_NAME_LENGTH} characters")
    elif has_control_characters(trimmed):
        errors.add(field, "must not contain control characters")
    return trimmed


def is_valid_scope(scope: str) -> bool:
    """A scope is lowercase segments separated by ':', optionally ending in a ':*' wildcard."""
    return len(scope) <= MAX_SCOPE_LENGTH and SCOPE_RE.match(scope) is not None


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    """Drop repeats, keeping first-seen order so the stored list reads as it was given."""
    return tuple(dict.fromkeys(values))


def check_scopes(scopes: Iterable[str], errors: Violations, field: str = "scopes") -> tuple[str, ...]:
    """Every scope must be well formed; at most 64 distinct scopes."""
    unique = _dedupe(scopes)
    for index, scope in enumerate(unique):
        if not is_valid_scope(scope):
            errors.add(
                f"{field}[{index}]",
                f"must be lowercase segments separated by ':' (like 'jobs:read' or 'jobs:*'), "
                f"at most {MAX_SCOPE_LENGTH} characters",
            )
    if len(unique) > MAX_SCOPES:
        errors.add(field, f"at most {MAX_SCOPES} scopes are allowed")
    return unique


def check_resource(resource: str, errors: Violations, field: str) -> str:
    """A resource is 1-256 characters without control characters."""
    if not resource:
        errors.add(field, "must not be empty")
    elif len(resource) > MAX_RESOURCE_LENGTH:
        errors.add(field, f"must be at most {MAX_RESOURCE_LENGTH} characters")
    elif has_control_characters(resource):
        errors.add(field, "must not contain control characters")
    return resource


def check_resources(
    resources: Iterable[str], errors: Violations, field: str = "resources"
) -> tuple[str, ...]:
    """At most 256 distinct, well-formed resources; empty means unrestricted."""
    unique = _dedupe(resources)
    for index, resource in enumerate(unique):
        check_resource(resource, errors, f"{field}[{index}]")
    if len(unique) > MAX_RESOURCES:
        errors.add(field, f"at most {MAX_RESOURCES} resources are allowed")
    return unique


def check_prefix(prefix: str, default: str, errors: Violations) -> str:
    """An empty prefix takes the server default; otherwise 1-16 of ``a-z0-9_`` starting with a letter."""
    if not prefix:
        return default
    if not is_valid_prefix(prefix):
        errors.add("prefix", "must be 1-16 characters of a-z 0-9 _ starting with a letter")
    return prefix


def check_metadata(metadata: dict[str, Any], errors: Violations, field: str = "metadata") -> dict[str, Any]:
    """Metadata is at most 8 KiB as compact JSON, which is also how it is stored."""
    try:
        encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        errors.add(field, "must not contain NaN or infinite numbers")
        return metadata
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        errors.add(field, f"must be at most {MAX_METADATA_BYTES} bytes serialized as JSON")
    elif _holds_nul(metadata):  # PostgreSQL's jsonb, like its text, cannot hold U+0000
        errors.add(field, "must not contain the NUL character (U+0000)")
    return metadata


def _holds_nul(value: object) -> bool:
    """Whether any key or string in a JSON value contains U+0000."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def check_reason(reason: str, errors: Violations, field: str = "reason") -> str | None:
    """A revocation reason is optional, at most 500 characters, without control characters."""
    trimmed = reason.strip()
    if len(trimmed) > MAX_REASON_LENGTH:
        errors.add(field, f"must be at most {MAX_REASON_LENGTH} characters")
    elif has_control_characters(trimmed):
        errors.add(field, "must not contain control characters")
    return trimmed or None


def check_page_size(page_size: int, errors: Violations) -> int:
    """0 means the default of 50; 1-500 is taken as is; anything else is an error."""
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        errors.add("page_size", f"must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}")
    return page_size


def check_key_id(key_id: str, errors: Violations, field: str = "id") -> str | None:
    """Return the canonical id, or None for a string that cannot name any key.

    Ids are opaque to clients, so a malformed one is simply unknown (NOT_FOUND), not a bad
    request; only a missing or absurdly long one is rejected as invalid.
    """
    if not key_id:
        errors.add(field, "is required")
        return None
    if len(key_id) > MAX_ID_LENGTH:
        errors.add(field, f"must be at most {MAX_ID_LENGTH} characters")
        return None
    return _canonical_id(key_id)


def _canonical_id(text: str) -> str | None:
    """A key id as stored (a lower-case UUID), or None for text that is no UUID."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def check_actor(actor: str, errors: Violations, field: str) -> str:
    """A filter naming who acted (``created_by``, an audit event's ``actor``), canonical.

    It is a key id, or a name keystile records for an action without a caller key
    (``bootstrap``, ``static-admin``, ``import``). Anything else printable matches nothing, like
    an unknown id; what could never be stored (too long, control characters, NUL) is a bad
    request, not a driver error (the fuzzer found a NUL reaching PostgreSQL).
    """
    if len(actor) > MAX_ID_LENGTH or not actor.isprintable():
        errors.add(field, f"must be a key id or a name of at most {MAX_ID_LENGTH} printable characters")
        return actor
    return _canonical_id(actor) or actor


# Scopes that grant others outright: writing keys is useless without reading them.
IMPLIED_SCOPES: Final = {"keys:write": frozenset({"keys:read"})}


def scope_covers(granted: Iterable[str], required: str) -> bool:
    """Whether a granted scope covers ``required``: equal, ``admin``, implied, or a ``prefix:*`` wildcard."""
    for scope in granted:
        if scope in (required, ADMIN_SCOPE) or required in IMPLIED_SCOPES.get(scope, ()):
            return True
        if scope.endswith(":*") and required.startswith(scope[:-1]):
            return True
    return False


MAX_HINT_LENGTH: Final = 64


def check_secret_hash(text: str, errors: Violations, field: str = "secret_hash") -> bytes:
    """A SHA-256 digest given as 64 hex digits or base64 (standard or URL-safe, padded or not)."""
    value = text.strip()
    digest = b""
    if len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
        digest = bytes.fromhex(value)
    elif 43 <= len(value) <= 44:
        try:
            digest = base64.b64decode(
                value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True
            )
        except (binascii.Error, ValueError):
            digest = b""
    if len(digest) != 32:
        errors.add(field, "must be a SHA-256 digest: 64 hex digits or 44 base64 characters")
    return digest


def check_hint(hint: str, errors: Violations, field: str = "secret_hint") -> str:
    """What lists and logs show for a key that keystile did not mint: short and printable."""
    if len(hint) > MAX_HINT_LENGTH or not hint.isprintable():
        errors.add(field, f"must be at most {MAX_HINT_LENGTH} printable characters")
    return hint
