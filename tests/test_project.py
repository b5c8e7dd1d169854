"""Project hygiene that users and other teams rely on: generated code, public API, settings, docs."""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys
from pathlib import Path

import pytest
from fix_server import ADMIN_KEY

import keystile
from keystile_server.settings import OPTIONS, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import genproto
    finally:
        sys.path.pop(0)
    for generated in genproto.generate(tmp_path):
        relative = generated.relative_to(tmp_path)
        committed = ROOT / "client" / relative
        assert committed.exists(), f"{relative} is not committed: run `make proto`"
        assert committed.read_bytes() == generated.read_bytes(), f"{relative} is stale: run `make proto`"


def test_public_api_all_is_sorted_and_complete() -> None:
    # isort-style order, as ruff keeps it: CONSTANTS, then Classes, then functions.
    assert keystile.__all__ == sorted(
        keystile.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n)
    )
    public = {
        name for name in vars(keystile) if not name.startswith("_") and name not in {"annotations", "v1"}
    }
    assert public == set(keystile.__all__)


def test_async_client_round_trip(server: object, owner: str) -> None:
    async def scenario() -> None:
        async with keystile.AsyncClient(server.address, api_key=ADMIN_KEY) as client:  # type: ignore[attr-defined]
            created = await client.create_key(owner, "async", scopes=["a"])
            verdict = await client.verify_key(created.secret, required_scopes=["a"])
            assert verdict.result == keystile.VerifyResult.Value("VERIFY_RESULT_VALID")
            assert [k.id async for k in client.iter_keys(owner)] == [created.key.id]
            with pytest.raises(keystile.NotFoundError) as info:
                await client.get_key("00000000-0000-0000-0000-000000000000")
            assert info.value.reason == "KEY_NOT_FOUND"
            await client.revoke_key(created.key.id)

    asyncio.run(scenario())


def test_client_default_deadline_applies() -> None:
    with (
        keystile.Client("127.0.0.1:1", timeout=0.5) as client,
        pytest.raises((keystile.UnavailableError, keystile.DeadlineExceededError)),
    ):
        client.get_key("x")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return parser.parse_args(argv)


def test_settings_flags_override_environment_override_defaults() -> None:
    env = {
        "KEYSTILE_LISTEN": "0.0.0.0:6000",
        "KEYSTILE_POOL_MAX_SIZE": "20",
        "KEYSTILE_DEFAULT_PREFIX": "env",
    }
    settings = Settings.resolve(_parse("--listen", "127.0.0.1:7000"), env)
    assert settings.listen == "127.0.0.1:7000"
    assert settings.pool_max_size == 20
    assert settings.default_prefix == "env"
    assert settings.database_url is None and settings.data_dir == Path(".keystile")
    assert Settings.resolve(None, {}) == Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEYSTILE_POOL_MAX_SIZE": "0"}, "KEYSTILE_POOL_MAX_SIZE"),
        ({"KEYSTILE_DB_TIMEOUT": "soon"}, "KEYSTILE_DB_TIMEOUT"),
        ({"KEYSTILE_DEFAULT_PREFIX": "Bad"}, "KEYSTILE_DEFAULT_PREFIX"),
        ({"KEYSTILE_LOG_LEVEL": "loud"}, "KEYSTILE_LOG_LEVEL"),
        ({"KEYSTILE_POOL_MIN_SIZE": "5", "KEYSTILE_POOL_MAX_SIZE": "2"}, "pool_min_size"),
        ({"KEYSTILE_WORKERS": "0"}, "KEYSTILE_WORKERS: must be at least 1"),
        ({"KEYSTILE_CACHE_MAX_ENTRIES": "-1"}, "KEYSTILE_CACHE_MAX_ENTRIES: must not be negative"),
        ({"KEYSTILE_MAX_STALENESS": "0"}, "KEYSTILE_MAX_STALENESS: must be positive"),
        ({"KEYSTILE_METRICS_LISTEN": "9464"}, "KEYSTILE_METRICS_LISTEN: must be HOST:PORT"),
        ({"KEYSTILE_METRICS_LISTEN": "localhost:99999"}, "KEYSTILE_METRICS_LISTEN: must be HOST:PORT"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.resolve(None, env)


def test_readme_documents_every_setting_and_the_key_format() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert option.env in readme, f"{option.env} missing from the README configuration table"
        assert option.flag in readme, f"{option.flag} missing from the README"
    assert keystile.KEY_PATTERN in readme


def test_bad_setting_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    from fix_server import run_cli

    done = run_cli("serve", "--pool-max-size", "0")
    assert done.returncode == 2 and "--pool-max-size" in done.stderr


def test_every_proto_element_is_commented() -> None:
    text = (ROOT / "proto/keystile/v1/keys.proto").read_text().splitlines()
    for i, line in enumerate(text):
        stripped = line.strip()
        if re.match(r"(service|rpc|message|enum|oneof)\b", stripped) or re.match(
            r"([A-Za-z.]+\s+)?[a-z_.A-Z]+\s+[a-z_A-Z0-9]+\s*=\s*\d+;", stripped
        ):
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"


@pytest.mark.parametrize(
    "weak",
    [
        "a" * 32,
        "abcdefghij" * 4,
        "password-password-password-12345",
        "0123456789" * 4,
        "keystile-admin-keystile-admin-keystile",
    ],
)
def test_an_obviously_guessable_admin_secret_is_refused(weak: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"KEYSTILE_ADMIN_KEY: is too predictable.*token_urlsafe"):
        Settings.resolve(None, {"KEYSTILE_ADMIN_KEY": weak})
    key_file = tmp_path / "admin.key"
    key_file.write_text(weak)
    with pytest.raises(SettingsError, match="admin-key-file: is too predictable"):
        Settings(admin_key_file=key_file).static_admin_key()


def test_generated_admin_secrets_are_accepted() -> None:
    for _ in range(2000):
        for secret in (secrets.token_hex(16), secrets.token_urlsafe(24), secrets.token_urlsafe(32)):
            assert Settings.resolve(None, {"KEYSTILE_ADMIN_KEY": secret}).admin_key == secret


def test_secret_files_readable_by_others_are_reported(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(secrets.token_urlsafe(32))
    tls_key = tmp_path / "tls.key"
    tls_key.write_text("not checked here")
    key_file.chmod(0o600)
    tls_key.chmod(0o600)
    settings = Settings(admin_key_file=key_file, tls_cert=tls_key, tls_key=tls_key)
    assert settings.exposed_secret_files() == []
    key_file.chmod(0o644)
    tls_key.chmod(0o640)
    warnings = settings.exposed_secret_files()
    assert len(warnings) == 2
    assert any("--admin-key-file" in w and "0644" in w and "chmod 600" in w for w in warnings)
    assert any("--tls-key" in w and "0640" in w for w in warnings)
    assert not any(key_file.read_text() in w for w in warnings)


def test_static_admin_key_rules(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="KEYSTILE_ADMIN_KEY: must be at least 32"):
        Settings.resolve(None, {"KEYSTILE_ADMIN_KEY": "short"})
    secret = secrets.token_urlsafe(32)
    key_file = tmp_path / "admin.key"
    key_file.write_text(secret + "\n")
    settings = Settings.resolve(None, {"KEYSTILE_ADMIN_KEY_FILE": str(key_file)})
    assert settings.static_admin_key() == secret
    assert secret not in repr(settings) and secret not in repr(Settings(admin_key=secret))
    key_file.write_text("too short")
    with pytest.raises(SettingsError, match="admin-key-file: must be at least 32"):
        settings.static_admin_key()
    with pytest.raises(SettingsError, match="not both"):
        Settings.resolve(None, {"KEYSTILE_ADMIN_KEY": secret, "KEYSTILE_ADMIN_KEY_FILE": str(key_file)})
    with pytest.raises(SettingsError, match="tls-cert and --tls-key"):
        Settings(tls_cert=key_file)
