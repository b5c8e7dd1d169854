"""The `keystile serve` command as users run it: grpcurl, the CLI, signals, restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from fix_server import (
    ADMIN_KEY,
    BIN,
    AioLoop,
    RunningServer,
    ServeProcess,
    free_port,
    postgres_for,
    run_cli,
    server_settings,
)
from google.protobuf import descriptor_pb2

import keystile
from keystile_server.metrics_http import METRICS_CLOSE_TIMEOUT


@pytest.fixture(scope="module")
def served(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `keystile serve` process on the session database."""
    proc = ServeProcess("--database-url", database_url, cwd=tmp_path_factory.mktemp("served"))
    proc.wait_serving()
    yield proc
    assert proc.stop() == 0, proc.log()


AS_ADMIN = ("-H", f"authorization: Bearer {ADMIN_KEY}")


def test_grpcurl_without_credentials_is_unauthenticated(served: ServeProcess) -> None:
    done = grpcurl("-plaintext", "-d", '{"owner_id": "x"}', served.address, "keystile.v1.KeyService/ListKeys")
    assert done.returncode != 0
    assert "Unauthenticated" in done.stderr and "CREDENTIALS_MISSING" in done.stderr


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_lists_services_through_reflection(served: ServeProcess) -> None:
    listed = grpcurl("-plaintext", served.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "keystile.v1.KeyService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = grpcurl("-plaintext", served.address, "describe", "keystile.v1.KeyService")
    assert "rpc VerifyKey" in described.stdout


def test_grpcurl_create_verify_revoke_verify(served: ServeProcess, owner: str) -> None:
    def call(method: str, body: dict[str, object]) -> dict[str, object]:
        done = grpcurl(
            "-plaintext",
            *AS_ADMIN,
            "-d",
            json.dumps(body),
            served.address,
            f"keystile.v1.KeyService/{method}",
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    created = call(
        "CreateKey", {"ownerId": owner, "name": "grpcurl", "scopes": ["jobs:read"], "ttl": "3600s"}
    )
    secret, key_id = created["secret"], created["key"]["id"]  # type: ignore[index]
    verdict = call("VerifyKey", {"key": secret, "requiredScopes": ["jobs:read"]})
    assert verdict["result"] == "VERIFY_RESULT_VALID"
    revoked = call("RevokeKey", {"id": key_id, "reason": "done"})
    assert revoked["key"]["state"] == "KEY_STATE_REVOKED"  # type: ignore[index]
    assert call("VerifyKey", {"key": secret})["result"] == "VERIFY_RESULT_REVOKED"
    health = grpcurl("-plaintext", served.address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_sees_error_details(served: ServeProcess) -> None:
    done = grpcurl(
        "-plaintext",
        *AS_ADMIN,
        "-d",
        '{"ownerId": "", "name": ""}',
        served.address,
        "keystile.v1.KeyService/CreateKey",
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr
    assert "owner_id" in done.stderr


def test_cli_end_to_end(served: ServeProcess, owner: str) -> None:
    target = ["--target", served.address]
    created = run_cli(
        "keys",
        "create",
        *target,
        "--owner",
        owner,
        "--name",
        "cli key",
        "--scope",
        "jobs:*",
        "--resource",
        "r1",
        "--ttl",
        "2h",
        "--metadata",
        '{"env": "prod"}',
        "--json",
    )
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    secret, key_id = body["secret"], body["key"]["id"]
    assert keystile.is_well_formed(secret)

    table = run_cli("keys", "get", *target, key_id)
    assert table.returncode == 0 and "cli key" in table.stdout and "jobs:*" in table.stdout
    assert secret not in table.stdout

    listed = run_cli("keys", "list", *target, "--owner", owner, "--json")
    assert [k["id"] for k in json.loads(listed.stdout)["keys"]] == [key_id]
    listed_table = run_cli("keys", "list", *target, "--owner", owner)
    assert key_id in listed_table.stdout and "ID" in listed_table.stdout

    valid = run_cli("keys", "verify", *target, secret, "--scope", "jobs:read", "--resource", "r1")
    assert valid.returncode == 0 and "VALID" in valid.stdout
    from_stdin = run_cli(
        "keys", "verify", *target, "-", "--scope", "keys:read", "--json", input=secret + "\n"
    )
    assert from_stdin.returncode == 3
    assert json.loads(from_stdin.stdout)["result"] == "INSUFFICIENT_SCOPE"

    revoked = run_cli("keys", "revoke", *target, key_id, "--reason", "rotated", "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "KEY_STATE_REVOKED"
    after = run_cli("keys", "verify", *target, secret)
    assert after.returncode == 3 and "REVOKED" in after.stdout
    assert run_cli("keys", "list", *target, "--owner", owner, "--json").stdout.count(key_id) == 0
    everything = run_cli("keys", "list", *target, "--owner", owner, "--include-inactive", "--all", "--json")
    assert [k["id"] for k in json.loads(everything.stdout)["keys"]] == [key_id]


def test_cli_lifecycle(served: ServeProcess, owner: str) -> None:
    """keys update, disable, enable, roll, revoke --cascade, delete, list --created-by/--hint, audit."""
    target = ["--target", served.address]

    def cli(*args: str) -> Any:
        words = 1 if args[0] == "audit" else 2
        done = run_cli(*args[:words], *target, *args[words:], "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout else None

    parent = cli("keys", "create", "--owner", owner, "--name", "parent", "--scope", "keys:write")
    child = run_cli(
        "keys", "create", *target, "--owner", owner, "--name", "child", "--json", api_key=parent["secret"]
    )
    child_id = json.loads(child.stdout)["key"]["id"]
    updated = cli("keys", "update", child_id, "--name", "renamed", "--scopes", "", "--expires", "never")
    assert updated["name"] == "renamed" and "scopes" not in updated
    assert cli("keys", "disable", child_id)["state"] == "KEY_STATE_DISABLED"
    assert cli("keys", "enable", child_id)["state"] == "KEY_STATE_ACTIVE"
    rolled = cli("keys", "roll", child_id, "--grace", "1h")
    assert rolled["key"]["replaces"] == child_id and keystile.is_well_formed(rolled["secret"])
    readable = run_cli("keys", "roll", *target, rolled["key"]["id"])
    assert "secret: " in readable.stdout and "stops working at" in readable.stdout
    made = cli("keys", "list", "--owner", owner, "--created-by", parent["key"]["id"])
    assert {k["name"] for k in made["keys"]} == {"renamed"}
    hint = parent["key"]["secret_hint"]
    assert [k["id"] for k in cli("keys", "list", "--hint", hint)["keys"]] == [parent["key"]["id"]]
    cascade = cli("keys", "revoke", parent["key"]["id"], "--cascade", "--reason", "leaked")
    assert child_id in cascade["cascaded_ids"]
    assert cli("keys", "delete", child_id) is None
    events = cli("audit", "--owner", owner, "--all")["events"]
    actions = [e["action"] for e in events]
    assert {
        "key.create",
        "key.update",
        "key.disable",
        "key.enable",
        "key.roll",
        "key.revoke",
        "key.delete",
    } <= set(actions)
    table = run_cli("audit", *target, "--key", child_id)
    assert "key.delete" in table.stdout and 'name: "child" -> "renamed"' in table.stdout
    nothing = run_cli("keys", "update", *target, child_id)
    assert nothing.returncode != 0 and "nothing to change" in nothing.stderr


def test_cli_pages(served: ServeProcess, owner: str) -> None:
    target = ["--target", served.address]
    with keystile.Client(served.address, api_key=ADMIN_KEY) as client:
        ids = [client.create_key(owner, f"k{i}").key.id for i in range(5)]
    first = json.loads(
        run_cli("keys", "list", *target, "--owner", owner, "--page-size", "2", "--json").stdout
    )
    assert len(first["keys"]) == 2 and first["next_page_token"]
    second = run_cli(
        "keys",
        "list",
        *target,
        "--owner",
        owner,
        "--page-size",
        "2",
        "--page-token",
        first["next_page_token"],
    )
    assert ids[2] in second.stdout and "more keys: --page-token" in second.stdout


def test_cli_errors(served: ServeProcess) -> None:
    bad = run_cli("keys", "create", "--target", served.address, "--owner", "bad owner", "--name", "x")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "owner_id" in bad.stderr
    missing = run_cli("keys", "get", "--target", served.address, "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "KEY_NOT_FOUND" in missing.stderr
    usage = run_cli(
        "keys", "create", "--target", served.address, "--owner", "o", "--name", "n", "--ttl", "soon"
    )
    assert usage.returncode == 2 and "invalid duration" in usage.stderr
    down = run_cli("keys", "list", "--target", "127.0.0.1:1", "--owner", "o", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_sigterm_lets_in_flight_calls_finish(database_url: str, tmp_path: Path, owner: str) -> None:
    proc = ServeProcess("--database-url", database_url, cwd=tmp_path)
    proc.wait_serving()
    with keystile.Client(proc.address, timeout=20, api_key=ADMIN_KEY) as client:
        key_id = client.create_key(owner, "slow").key.id
        results: list[object] = []
        with psycopg.connect(database_url) as blocker:
            # Hold the row lock so that RevokeKey is still running when SIGTERM arrives.
            blocker.execute("SELECT 1 FROM keystile.keys WHERE id = %s FOR UPDATE", (key_id,))
            call = threading.Thread(target=lambda: results.append(client.revoke_key(key_id, reason="late")))
            call.start()
            time.sleep(0.5)
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.proc.poll() is None, "the server quit with a call in flight"
        call.join(20)
    assert proc.stop() == 0, proc.log()
    assert len(results) == 1 and results[0].revoke_reason == "late"  # type: ignore[attr-defined]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_database_survives_restart_and_stops_with_the_server(tmp_path: Path, sig: int) -> None:
    data_dir = tmp_path / "data"
    first = ServeProcess("--data-dir", str(data_dir), cwd=tmp_path, env={"KEYSTILE_DATABASE_URL": ""})
    first.wait_serving()
    pgdata = (data_dir / "pgdata").resolve()
    assert postgres_for(pgdata), "the embedded PostgreSQL should be running"
    with keystile.Client(first.address, api_key=ADMIN_KEY) as client:
        created = client.create_key("team-persist", "survivor")
    assert first.stop(sig) == 0, first.log()
    assert not postgres_for(pgdata), "the embedded PostgreSQL outlived the server"
    assert first.proc.poll() == 0

    second = ServeProcess("--data-dir", str(data_dir), cwd=tmp_path, env={"KEYSTILE_DATABASE_URL": ""})
    second.wait_serving()
    with keystile.Client(second.address, api_key=ADMIN_KEY) as client:
        assert client.verify_key(created.secret).result == keystile.VerifyResult.Value("VERIFY_RESULT_VALID")
        assert client.get_key(created.key.id).name == "survivor"
    assert second.stop() == 0, second.log()
    assert not postgres_for(pgdata)


def test_repeated_sigterm_during_shutdown_still_exits_cleanly(tmp_path: Path) -> None:
    """Process managers repeat SIGTERM; none of the repeats may turn a clean stop into a kill."""
    data_dir = tmp_path / "data"
    served = ServeProcess("--data-dir", str(data_dir), cwd=tmp_path, env={"KEYSTILE_DATABASE_URL": ""})
    served.wait_serving()
    assert served.stop_insistently() == 0, served.log()
    assert not postgres_for((data_dir / "pgdata").resolve()), "the embedded PostgreSQL outlived the server"
    assert served.log().count("stopped") == 1


def test_stop_does_not_queue_behind_a_busy_default_executor(
    aio: AioLoop, start_server: Callable[..., RunningServer], database_url: str
) -> None:
    """Closing /metrics takes a thread of its own: with the loop's executor full, stop() still ends.

    CI once saw stop() sit at the /metrics shutdown on a loaded machine; every thread of the
    default executor (``asyncio.to_thread``'s) can be taken by other work at such a moment.
    """
    running = start_server(server_settings(database_url))
    port = running.server.metrics_port
    release = threading.Event()

    async def occupy() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):  # more than the default executor's min(32, CPUs + 4) threads
            loop.run_in_executor(None, release.wait, 30)

    try:
        aio.run(occupy())
        started = time.monotonic()
        running.stop()
        stopped_in = time.monotonic() - started
    finally:
        release.set()
    assert stopped_in < METRICS_CLOSE_TIMEOUT, f"stop() waited {stopped_in:.1f}s for the executor"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_taken_port_fails_loudly(served: ServeProcess, tmp_path: Path, database_url: str) -> None:
    clash = subprocess.run(
        [str(BIN / "keystile"), "serve", "--listen", served.address, "--database-url", database_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert clash.returncode == 1
    assert "cannot listen" in clash.stderr


@pytest.mark.parametrize("command", ["migrate", "bootstrap"])
def test_database_commands_say_why_in_one_line(command: str, tmp_path: Path) -> None:
    url = f"postgresql://keystile:hunter2-secret@127.0.0.1:{free_port()}/keystile"
    result = run_cli(command, "--database-url", url, "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot {command}:"), result.stderr
    assert "refused" in lines[0].lower()


def test_serve_logs_why_the_database_is_not_ready(tmp_path: Path) -> None:
    url = f"postgresql://keystile:hunter2-secret@127.0.0.1:{free_port()}/keystile"
    served = ServeProcess("--database-url", url, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while "database not ready" not in served.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        served.stop()
    log = served.log()
    line = next(line for line in log.splitlines() if "database not ready" in line)
    assert "Connection refused" in line and "127.0.0.1" in line
    assert "hunter2" not in log and "Traceback" not in log


def test_version() -> None:
    done = subprocess.run([str(BIN / "keystile"), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"keystile {keystile.__version__}"
    assert keystile.__version__ != "0+unknown"


def test_the_client_reads_target_and_key_from_the_environment(
    served: ServeProcess, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYSTILE_TARGET", served.address)
    monkeypatch.setenv("KEYSTILE_API_KEY", ADMIN_KEY)
    with keystile.Client() as client:  # as in the README: neither target nor key given
        created = client.create_key(owner, "from the environment")
        assert client.verify_key(created.secret).result == keystile.VerifyResult.Value("VERIFY_RESULT_VALID")
    with keystile.Client(api_key="") as anonymous, pytest.raises(keystile.UnauthenticatedError):
        anonymous.list_keys(owner)  # "" means no key, whatever the environment says


def test_reflection_v1_and_v1alpha_resolve_methods_with_their_comments(served: ServeProcess) -> None:
    listed = grpcurl("-plaintext", served.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "keystile.v1.KeyService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    } <= services
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= services
    method = grpcurl("-plaintext", served.address, "describe", "keystile.v1.KeyService.CreateKey")
    assert method.returncode == 0, method.stderr  # grpc/grpc#34743: "Symbol not found" before
    assert "rpc CreateKey" in method.stdout
    assert "the secret is never returned again" in method.stdout  # the proto's comment
    message = grpcurl("-plaintext", served.address, "describe", "keystile.v1.RateLimit")
    assert "1 second to 1 day" in message.stdout
    detail = grpcurl("-plaintext", served.address, "describe", "google.rpc.ErrorInfo")
    assert detail.returncode == 0 and "message ErrorInfo" in detail.stdout
    missing = grpcurl("-plaintext", served.address, "describe", "keystile.v1.KeyService.NoSuchMethod")
    assert missing.returncode != 0


def test_reflection_v1_answers_on_its_own_path(served: ServeProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(served.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="keystile.v1.KeyService.VerifyKey"
        )
        (response,) = list(call(iter([request]), timeout=10))
    assert response.HasField("file_descriptor_response")
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(b).name
        for b in response.file_descriptor_response.file_descriptor_proto
    ]
    assert "keystile/v1/keys.proto" in names


def test_grpcurl_decodes_error_details_through_reflection(served: ServeProcess) -> None:
    done = grpcurl(
        "-plaintext",
        *AS_ADMIN,
        "-d",
        '{"owner_id": "bad owner!"}',
        served.address,
        "keystile.v1.KeyService/CreateKey",
    )
    assert done.returncode != 0
    assert '"reason":"INVALID_ARGUMENT"' in done.stderr.replace(" ", "")
    assert "google.rpc.BadRequest" in done.stderr and "is not recognized" not in done.stderr
    assert '"field":"owner_id"' in done.stderr.replace(" ", "")
