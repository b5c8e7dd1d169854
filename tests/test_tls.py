"""TLS and mTLS: encrypted transport, plaintext refused, client certificates enforced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fix_server import ADMIN_KEY, RunningServer, run_cli, server_settings
from fix_tls import Issued, TestCA

import keystile


def _tls_server(
    start: Callable[..., RunningServer], url: str, pki: dict[str, Any], mtls: bool
) -> RunningServer:
    server: Issued = pki["server"]
    ca: TestCA = pki["ca"]
    return start(
        server_settings(
            url,
            listen="localhost:0",
            tls_cert=server.cert,
            tls_key=server.key,
            tls_client_ca=ca.path if mtls else None,
        )
    )


def test_tls_round_trip_and_plaintext_is_refused(
    start_server: Callable[..., RunningServer], database_url: str, pki: dict[str, Any], owner: str
) -> None:
    running = _tls_server(start_server, database_url, pki, mtls=False)
    try:
        with keystile.Client(running.address, api_key=ADMIN_KEY, tls_ca=pki["ca"].path) as client:
            created = client.create_key(owner, "over tls")
            assert client.verify_key(created.secret).result == keystile.VerifyResult.Value(
                "VERIFY_RESULT_VALID"
            )
        with (
            keystile.Client(running.address, api_key=ADMIN_KEY, timeout=3) as plaintext,
            pytest.raises(keystile.UnavailableError),
        ):
            plaintext.list_keys(owner)
        with (
            keystile.Client(
                running.address, api_key=ADMIN_KEY, tls_ca=pki["rogue_client"].cert, timeout=3
            ) as untrusting,
            pytest.raises(keystile.UnavailableError),
        ):
            untrusting.list_keys(owner)  # the server's certificate is not from a CA we trust
        cli = run_cli(
            "keys",
            "list",
            "--target",
            running.address,
            "--owner",
            owner,
            "--tls-ca",
            str(pki["ca"].path),
            "--json",
        )
        assert cli.returncode == 0 and created.key.id in cli.stdout
    finally:
        running.stop()


def test_mtls_requires_a_client_certificate_from_the_trusted_ca(
    start_server: Callable[..., RunningServer], database_url: str, pki: dict[str, Any], owner: str
) -> None:
    running = _tls_server(start_server, database_url, pki, mtls=True)
    ca = pki["ca"].path
    try:
        good: Issued = pki["client"]
        with keystile.Client(
            running.address, api_key=ADMIN_KEY, tls_ca=ca, tls_cert=good.cert, tls_key=good.key
        ) as client:
            assert client.create_key(owner, "mtls").key.owner_id == owner
        with (
            keystile.Client(running.address, api_key=ADMIN_KEY, tls_ca=ca, timeout=3) as anonymous,
            pytest.raises(keystile.UnavailableError),
        ):
            anonymous.list_keys(owner)
        rogue: Issued = pki["rogue_client"]
        with (
            keystile.Client(
                running.address,
                api_key=ADMIN_KEY,
                tls_ca=ca,
                tls_cert=rogue.cert,
                tls_key=rogue.key,
                timeout=3,
            ) as impostor,
            pytest.raises(keystile.UnavailableError),
        ):
            impostor.list_keys(owner)
        cli = run_cli(
            "keys",
            "list",
            "--target",
            running.address,
            "--owner",
            owner,
            "--tls-ca",
            str(ca),
            "--tls-cert",
            str(good.cert),
            "--tls-key",
            str(good.key),
        )
        assert cli.returncode == 0, cli.stderr
    finally:
        running.stop()
