"""Test configuration: fixtures live in tests/fix_*.py (see each module's docstring)."""

from __future__ import annotations

pytest_plugins = ["fix_cache", "fix_db", "fix_proxy", "fix_server", "fix_tls"]
