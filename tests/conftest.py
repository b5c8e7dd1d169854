"""Test configuration: fixtures live in tests/fix_*.py (see each module's docstring)."""

from __future__ import annotations

import os

pytest_plugins = ["fix_cache", "fix_db", "fix_http", "fix_proxy", "fix_server", "fix_tls"]

# Clients read these when not given a target or key: a developer's own must not leak into tests.
for _name in ("KEYSTILE_TARGET", "KEYSTILE_API_KEY"):
    os.environ.pop(_name, None)
