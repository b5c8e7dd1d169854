"""The Node.js example (examples/node) against a real server: create, watch, verify, revoke, error details.

Runs when ``node`` and ``npm`` are on PATH; its npm packages are installed from the registry
through the example's own package.json on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fix_server import ADMIN_KEY, RunningServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    return EXAMPLE / "node_modules"


def test_the_node_example_runs_against_a_real_server(node_modules: Path, server: RunningServer) -> None:
    done = subprocess.run(
        ["node", str(EXAMPLE / "keystile-example.js")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEYSTILE_TARGET": server.address, "KEYSTILE_API_KEY": ADMIN_KEY},
    )
    assert done.returncode == 0, done.stderr
    steps = {line["step"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert steps["verified"]["result"] == "VERIFY_RESULT_VALID"
    assert "hash" in steps["invalidated"]  # the INVALIDATE named the revoked key's SHA-256
    assert steps["verified again"]["result"] == "VERIFY_RESULT_REVOKED"
    bad = steps["bad request"]
    assert bad["details"]["google.rpc.ErrorInfo"] == {"reason": "INVALID_ARGUMENT", "domain": "keystile.dev"}
    fields = [v["field"] for v in bad["details"]["google.rpc.BadRequest"]["field_violations"]]
    assert fields == ["owner_id", "name"]
    assert ADMIN_KEY not in done.stdout
