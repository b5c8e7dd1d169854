"""The key store: every SQL statement keystile runs lives in this package.

``KeyStore`` speaks domain values (``NewKey`` in, ``KeyRecord`` out) and neutral errors: a
database that cannot be reached becomes ``StoreUnavailable``, so callers never see psycopg.
"""

from __future__ import annotations

from .key_store import KeyStore
from .migrate import migrate

__all__ = ["KeyStore", "migrate"]
