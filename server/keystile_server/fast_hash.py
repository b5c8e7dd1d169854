"""SHA-256 for the verification path: the interpreter's own implementation, where it has one.

For a key of about 50 bytes, much of hashlib's OpenSSL-backed ``sha256`` goes to setting up an
EVP context; CPython's built-in module (``_sha256``, ``_sha2`` from 3.12) computes the same
digest with less per-call work, which showed on the loaded server in ``make bench``'s Envoy Check
(target 12). Both give the digest ``keystile.hash_key`` stores keys under (a test checks).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import Any, Final


def _builtin_sha256() -> Callable[[bytes], Any]:
    for name in ("_sha256", "_sha2"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


sha256: Final = _builtin_sha256()
"""``sha256(data).digest()``, as hashlib's."""
