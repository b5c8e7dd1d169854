"""keystile: the Python client for the keystile API-key service.

``Client`` and ``AsyncClient`` wrap the generated ``keystile.v1`` stubs with a default deadline and
typed exceptions. ``is_well_formed`` checks a key's format and checksum offline, as the server does
before any lookup.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from ._async_client import AsyncClient
from ._cache import CacheStats
from ._client import DEFAULT_TARGET, DEFAULT_TIMEOUT, Client, create_key_request
from ._errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KeystileError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._format import KEY_PATTERN, generate_key, hash_key, is_well_formed, parse_key
from ._lifecycle import audit_request, roll_key_request, update_key_request
from ._limits import credits, owner_policy, rate_limit
from .v1.keys_pb2 import Key, KeyState, VerifyResult

try:
    __version__ = _metadata.version("keystile")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "KEY_PATTERN",
    "AlreadyExistsError",
    "AsyncClient",
    "CacheStats",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "Key",
    "KeyState",
    "KeystileError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "VerifyResult",
    "audit_request",
    "create_key_request",
    "credits",
    "generate_key",
    "hash_key",
    "is_well_formed",
    "owner_policy",
    "parse_key",
    "rate_limit",
    "roll_key_request",
    "update_key_request",
]
