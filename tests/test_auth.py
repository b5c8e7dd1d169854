"""Caller authentication, scopes, tenancy and no-escalation: every RPC crossed with every role."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from fix_db import Db
from fix_server import ADMIN_KEY, RunningServer, run_cli, server_settings

import keystile
from keystile._format import generate_key
from keystile.v1 import keys_pb2


@dataclass
class Principal:
    name: str
    secret: str
    key_id: str
    owner: str


@pytest.fixture(scope="module")
def tenants(server: RunningServer) -> Iterator[dict[str, Any]]:
    """Two owners; in the first, one caller per role; in the second, a victim key."""
    home, other = f"home-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    with server.client() as admin_client:

        def mint(owner: str, name: str, scopes: list[str], **kw: Any) -> Principal:
            created = admin_client.create_key(owner, name, scopes=scopes, **kw)
            return Principal(name, created.secret, created.key.id, owner)

        roles = {
            "admin": mint(f"ops-{uuid.uuid4().hex[:6]}", "admin", ["admin"]),
            "writer": mint(home, "writer", ["keys:write"]),
            "reader": mint(home, "reader", ["keys:read"]),
            "verifier": mint(home, "verifier", ["keys:verify"]),
            "unprivileged": mint(home, "unprivileged", ["jobs:read"]),
        }
        yield {"home": home, "other": other, "roles": roles, "mint": mint}


ROLES = ["admin", "writer", "reader", "verifier", "unprivileged"]
OK, DENIED, NOT_FOUND = "ok", "denied", "not_found"
# What each role may do: on its own owner's keys, and on another owner's.
MATRIX = {
    ("create", "own"): {
        "admin": OK,
        "writer": OK,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("create", "other"): {
        "admin": OK,
        "writer": DENIED,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("get", "own"): {"admin": OK, "writer": OK, "reader": OK, "verifier": DENIED, "unprivileged": DENIED},
    ("get", "other"): {
        "admin": OK,
        "writer": NOT_FOUND,
        "reader": NOT_FOUND,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("list", "own"): {"admin": OK, "writer": OK, "reader": OK, "verifier": DENIED, "unprivileged": DENIED},
    ("list", "other"): {
        "admin": OK,
        "writer": DENIED,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("revoke", "own"): {
        "admin": OK,
        "writer": OK,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("revoke", "other"): {
        "admin": OK,
        "writer": NOT_FOUND,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("verify", "own"): {r: OK for r in ROLES},
    ("verify", "other"): {r: OK for r in ROLES},
    # Owner policies and credit balances: admins change them; readers see their own owner's.
    ("set_policy", "own"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("set_policy", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("delete_policy", "own"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("delete_policy", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("get_policy", "own"): {
        "admin": OK,
        "writer": OK,
        "reader": OK,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("get_policy", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("get_credits", "own"): {
        "admin": OK,
        "writer": OK,
        "reader": OK,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("get_credits", "other"): {
        "admin": OK,
        "writer": NOT_FOUND,
        "reader": NOT_FOUND,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("update_credits", "own"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("update_credits", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
    # The key lifecycle: writers act on their own owner's keys, as RevokeKey; another owner's
    # key is an unknown id to them.
    **{
        (rpc, whose): {
            "admin": OK,
            "writer": OK if whose == "own" else NOT_FOUND,
            "reader": DENIED,
            "verifier": DENIED,
            "unprivileged": DENIED,
        }
        for rpc in ("update", "disable", "revoke_cascade", "delete")
        for whose in ("own", "other")
    },
    # Rolling hands out a secret with the key's whole grant: a writer lacking jobs:read may not.
    ("roll", "own"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("roll", "other"): {
        "admin": OK,
        "writer": NOT_FOUND,
        "reader": DENIED,
        "verifier": DENIED,
        "unprivileged": DENIED,
    },
    ("audit", "own"): {"admin": OK, "writer": OK, "reader": OK, "verifier": DENIED, "unprivileged": DENIED},
    ("import", "own"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("import", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
    ("audit", "other"): {r: OK if r == "admin" else DENIED for r in ROLES},
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("rpc", "whose"), list(MATRIX))
def test_role_matrix(
    server: RunningServer, tenants: dict[str, Any], db: Db, rpc: str, whose: str, role: str
) -> None:
    caller: Principal = tenants["roles"][role]
    owner = caller.owner if whose == "own" else tenants["other"]
    if role == "admin" and whose == "own":
        owner = tenants["home"]  # an admin's "own" case acts on a tenant too
    with server.client() as admin_client:
        target = admin_client.create_key(owner, "target", scopes=["jobs:read"], credits=1000)
        dead = admin_client.create_key(owner, "dead")
        admin_client.revoke_key(dead.key.id)
        admin_client.set_owner_policy(keystile.owner_policy(owner, max_active_keys=1000))
    before = db.snapshot()
    calls: dict[str, Callable[[keystile.Client], Any]] = {
        "create": lambda c: c.create_key(owner, "new"),
        "get": lambda c: c.get_key(target.key.id),
        "list": lambda c: c.list_keys(owner),
        "revoke": lambda c: c.revoke_key(target.key.id, reason="test"),
        "verify": lambda c: c.verify_key(target.secret),
        "set_policy": lambda c: c.set_owner_policy(keystile.owner_policy(owner, max_active_keys=999)),
        "get_policy": lambda c: c.get_owner_policy(owner),
        "delete_policy": lambda c: c.delete_owner_policy(owner),
        "get_credits": lambda c: c.get_credits(target.key.id),
        "update_credits": lambda c: c.update_credits(target.key.id, add=1),
        "update": lambda c: c.update_key(target.key.id, name="renamed"),
        "disable": lambda c: c.update_key(target.key.id, disabled=True),
        "revoke_cascade": lambda c: c.revoke_keys(target.key.id),
        "delete": lambda c: c.delete_key(dead.key.id),
        "roll": lambda c: c.roll_key(target.key.id, grace_period=60),
        "audit": lambda c: c.list_audit_events(owner_id=owner),
        "import": lambda c: c.import_keys(
            [keys_pb2.ImportedKey(secret_hash=os.urandom(32).hex(), owner_id=owner, name="moved in")]
        ),
    }
    expected = MATRIX[(rpc, whose)][role]
    with server.client(api_key=caller.secret) as client:
        if expected == OK:
            result = calls[rpc](client)
            if rpc == "create":
                assert result.key.owner_id == owner and result.key.created_by == caller.key_id
            if rpc == "list":
                assert target.key.id in [k.id for k in result.keys]
            if rpc == "verify":
                assert result.result == keys_pb2.VERIFY_RESULT_VALID
            if rpc == "get_policy":
                assert result.owner_id == owner and result.max_active_keys == 1000
            if rpc == "get_credits":
                assert result.remaining == 1000
            if rpc == "update":
                assert result.name == "renamed"
            if rpc == "disable":
                assert result.disabled and result.state == keys_pb2.KEY_STATE_DISABLED
            if rpc == "roll":
                assert result.key.replaces == target.key.id and result.secret != target.secret
            if rpc == "import":
                assert result.imported == 1 and client.get_key(result.results[0].id).owner_id == owner
            if rpc == "audit":
                assert {e.key_id for e in result.events} >= {target.key.id, dead.key.id}
                assert all(e.owner_id == owner for e in result.events)
            return
        error_type = keystile.PermissionDeniedError if expected == DENIED else keystile.NotFoundError
        with pytest.raises(error_type) as info:
            calls[rpc](client)
    if expected == NOT_FOUND:
        # Exactly what an unknown id answers: no existence oracle.
        with server.client() as admin_client, pytest.raises(keystile.NotFoundError) as unknown:
            admin_client.get_key(str(uuid.uuid4()))
        assert (info.value.code, info.value.message, info.value.reason) == (
            unknown.value.code,
            unknown.value.message,
            unknown.value.reason,
        )
    assert db.snapshot() == before, "a refused call changed the table"


def test_unauthenticated_callers(server: RunningServer, tenants: dict[str, Any], db: Db) -> None:
    mint = tenants["mint"]
    revoked = mint(tenants["home"], "revoked", ["admin"])
    expired = mint(tenants["home"], "expired", ["admin"], ttl=timedelta(seconds=1))
    with server.client() as admin_client:
        admin_client.revoke_key(revoked.key_id)
    import time

    time.sleep(1.1)
    cases = {
        None: "CREDENTIALS_MISSING",
        "": "CREDENTIALS_MISSING",
        "Basic dXNlcjpwdw==": "CREDENTIALS_MALFORMED",
        f"Bearer {'x' * 40}": "CREDENTIALS_MALFORMED",
        f"Bearer {generate_key('ks')}": "CREDENTIALS_UNKNOWN",
        f"Bearer {revoked.secret}": "CREDENTIALS_REVOKED",
        f"Bearer {expired.secret}": "CREDENTIALS_EXPIRED",
    }
    before = db.snapshot()
    for header, reason in cases.items():
        metadata = [("authorization", header)] if header is not None else []
        from keystile.v1 import keys_pb2_grpc

        with grpc.insecure_channel(server.address) as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            for method, request in [
                (stub.CreateKey, keys_pb2.CreateKeyRequest(owner_id="x", name="y")),
                (stub.GetKey, keys_pb2.GetKeyRequest(id=str(uuid.uuid4()))),
                (stub.ListKeys, keys_pb2.ListKeysRequest(owner_id="x")),
                (stub.RevokeKey, keys_pb2.RevokeKeyRequest(id=revoked.key_id)),
            ]:
                with pytest.raises(grpc.RpcError) as info:
                    method(request, timeout=5, metadata=metadata)
                error = keystile._errors.from_rpc_error(info.value)
                assert error.code == grpc.StatusCode.UNAUTHENTICATED
                assert error.reason == reason, (header, error.reason)
                if header:
                    assert header.split(" ", 1)[1] not in str(error)
            # Health and reflection stay open.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert db.snapshot() == before


def test_no_escalation(server: RunningServer, tenants: dict[str, Any]) -> None:
    home = tenants["home"]
    soon = datetime.now(UTC) + timedelta(hours=1)
    limited = tenants["mint"](
        home, "limited", ["keys:write", "jobs:*"], resources=["r1", "r2"], expire_time=soon
    )
    with server.client(api_key=limited.secret) as client:
        refused = {
            "scopes[0]": dict(scopes=["admin"], resources=["r1"], ttl=60),
            "scopes[1]": dict(scopes=["jobs:read", "billing:read"], resources=["r1"], ttl=60),
            "resources": dict(scopes=["jobs:read"], ttl=60),
            "resources[1]": dict(scopes=["jobs:read"], resources=["r1", "r3"], ttl=60),
            "expire_time": dict(scopes=["jobs:read"], resources=["r1"]),
            "ttl": dict(scopes=["jobs:read"], resources=["r1"], ttl=7200),
        }
        for field, options in refused.items():
            with pytest.raises(keystile.PermissionDeniedError) as info:
                client.create_key(home, "escalate", **options)
            assert field in info.value.field_violations, (field, info.value.field_violations)
            assert info.value.reason == "ESCALATION"
        allowed = client.create_key(
            home, "fine", scopes=["jobs:read", "jobs:*", "keys:read"], resources=["r2"], expire_time=soon
        ).key
        assert allowed.created_by == limited.key_id
        assert list(allowed.scopes) == ["jobs:read", "jobs:*", "keys:read"]


@pytest.fixture
def required_server(start_server: Callable[..., RunningServer], database_url: str) -> Iterator[RunningServer]:
    running = start_server(server_settings(database_url, verify_auth="required"))
    yield running
    running.stop()


def test_verify_auth_required(required_server: RunningServer, tenants: dict[str, Any]) -> None:
    roles = tenants["roles"]
    with required_server.client() as admin_client:
        target = admin_client.create_key(tenants["other"], "t")

    def refused_to_callers_who_may_not_verify() -> None:
        with required_server.client(api_key=None) as anonymous, pytest.raises(keystile.UnauthenticatedError):
            anonymous.verify_key(target.secret)
        with (
            required_server.client(api_key=roles["reader"].secret) as reader,
            pytest.raises(keystile.PermissionDeniedError),
        ):
            reader.verify_key(target.secret)

    refused_to_callers_who_may_not_verify()
    for role in ("verifier", "admin"):
        with required_server.client(api_key=roles[role].secret) as client:
            for _ in range(3):  # the later ones are answered from the cache
                assert client.verify_key(target.secret).result == keys_pb2.VERIFY_RESULT_VALID
    refused_to_callers_who_may_not_verify()  # also once the key is cached


def test_bootstrap_command(make_database: Callable[[], str]) -> None:
    url = make_database()
    first = run_cli("bootstrap", "--database-url", url, api_key=None)
    assert first.returncode == 0, first.stderr
    secret = next(w for w in first.stdout.split() if keystile.is_well_formed(w))
    assert f"authorization: Bearer {secret}" in first.stdout and "grpcurl" in first.stdout
    again = run_cli("bootstrap", "--database-url", url, api_key=None)
    assert again.returncode == 1 and "already exists" in again.stderr and secret not in again.stderr
    quiet = run_cli("bootstrap", "--database-url", url, "--if-missing", api_key=None)
    assert quiet.returncode == 0 and "already exists" in quiet.stdout
    forced = run_cli("bootstrap", "--database-url", url, "--force", api_key=None)
    assert forced.returncode == 0 and secret not in forced.stdout
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT scopes, created_by FROM keystile.keys").fetchall()
    assert rows == [(["admin"], "bootstrap"), (["admin"], "bootstrap")]


def test_bootstrapped_key_administers(
    start_server: Callable[..., RunningServer], make_database: Callable[[], str]
) -> None:
    url = make_database()
    done = run_cli("bootstrap", "--database-url", url, api_key=None)
    secret = next(w for w in done.stdout.split() if keystile.is_well_formed(w))
    running = start_server(server_settings(url, admin_key=None))
    try:
        with running.client(api_key=secret) as client:
            created = client.create_key("any-team", "made by bootstrap admin")
            assert created.key.created_by != ""
        with running.client(api_key=ADMIN_KEY) as client, pytest.raises(keystile.UnauthenticatedError):
            client.list_keys("any-team")  # no static key configured on this server
    finally:
        running.stop()


def test_no_secret_in_logs_errors_or_exceptions(
    server: RunningServer, tenants: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = [ADMIN_KEY]
    texts: list[str] = []
    with server.client() as admin:
        created = admin.create_key(tenants["home"], "logged", scopes=["keys:write"])
        secrets.append(created.secret)
        with server.client(api_key=created.secret) as caller:
            made = caller.create_key(tenants["home"], "child")
            secrets.append(made.secret)
            caller.get_key(made.key.id)
            caller.list_keys(tenants["home"])
            caller.verify_key(made.secret)
            caller.revoke_key(made.key.id, reason="rotate")
            caller.verify_key(made.secret)
            for attempt in (
                lambda: caller.create_key(tenants["home"], "x", scopes=["admin"]),
                lambda: caller.list_keys(tenants["other"]),
            ):
                with pytest.raises(keystile.KeystileError) as info:
                    attempt()
                texts.append(str(info.value) + repr(info.value) + info.value.message)
        # A changed last character breaks the checksum; it must differ from the real one (1 in 62 is not).
        tampered = created.secret[:-1] + ("x" if created.secret[-1] != "x" else "y")
        for header in (made.secret, tampered):
            with server.client(api_key=header) as bad, pytest.raises(keystile.KeystileError) as info:
                bad.get_key(created.key.id)
            texts.append(str(info.value) + repr(info.value))
        admin.revoke_key(created.key.id)
        with (
            server.client(api_key=created.secret) as revoked,
            pytest.raises(keystile.UnauthenticatedError) as info,
        ):
            revoked.list_keys(tenants["home"])
        texts.append(str(info.value))
    everything = caplog.text + "\n".join(texts) + repr(server.server.settings)
    assert f"by={created.key.id}" in caplog.text  # attribution is the caller's key id
    for secret in secrets:
        assert secret not in everything
        random_part = secret.rsplit("_", 1)[-1]
        assert random_part[8:] not in everything


@pytest.mark.parametrize("role", ["writer", "reader", "verifier", "unprivileged", "admin"])
def test_admin_keys_are_out_of_every_tenants_reach(server: RunningServer, db: Db, role: str) -> None:
    """A non-admin key of the owner "admin" (the bootstrap keys' owner) cannot see or revoke admin keys."""
    owner = "admin"
    scopes = {
        "writer": ["keys:write"],
        "reader": ["keys:read"],
        "verifier": ["keys:verify"],
        "unprivileged": ["jobs:read"],
        "admin": ["admin"],
    }[role]
    with server.client() as static_admin:
        bootstrap_like = static_admin.create_key(owner, f"admin key {uuid.uuid4().hex[:6]}", scopes=["admin"])
        tenant_key = static_admin.create_key(owner, "ordinary key", scopes=["jobs:read"])
        caller = static_admin.create_key(owner, role, scopes=scopes)
    before = db.snapshot()
    with server.client(api_key=caller.secret) as client:
        if role == "admin":
            assert client.get_key(bootstrap_like.key.id).id == bootstrap_like.key.id
            listed = [k.id for k in client.list_keys(owner, page_size=500).keys]
            assert bootstrap_like.key.id in listed
            return
        can_read = role in ("writer", "reader")
        with pytest.raises(keystile.NotFoundError if can_read else keystile.PermissionDeniedError):
            client.get_key(bootstrap_like.key.id)
        if can_read:
            assert client.get_key(tenant_key.key.id).id == tenant_key.key.id  # the tenant's own: fine
            listed = [k.id for k in client.list_keys(owner, page_size=500, include_inactive=True).keys]
            assert tenant_key.key.id in listed and bootstrap_like.key.id not in listed
            assert not any("admin" in k.scopes for k in client.list_keys(owner, page_size=500).keys)
        with pytest.raises(keystile.NotFoundError if role == "writer" else keystile.PermissionDeniedError):
            client.revoke_key(bootstrap_like.key.id, reason="takeover")
    assert db.snapshot() == before, "a refused call changed the table"
    with server.client(api_key=bootstrap_like.secret) as still_admin:
        assert still_admin.get_key(bootstrap_like.key.id).state == keys_pb2.KEY_STATE_ACTIVE
