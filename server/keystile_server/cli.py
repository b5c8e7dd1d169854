"""The ``keystile`` command: serve, migrate, and manage keys against a running server.

Key commands print a readable table by default and JSON with ``--json`` (for scripts).
``keys verify`` exits 0 for a valid key and 3 for any other result, so shells can branch on it;
failed calls exit 1 with the server's message and reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import keystile
from keystile import Client, KeystileError
from keystile.v1 import keys_pb2

from .cli_import import add_command as add_import_command
from .cli_lifecycle import add_commands as add_audit_command
from .cli_lifecycle import add_key_commands
from .cli_limits import add_commands, add_create_arguments, create_options, parse_duration
from .cli_output import (
    key_dict,
    parse_json_object,
    parse_timestamp,
    print_json,
    print_key,
    show_key,
    state_text,
    table,
    time_text,
)
from .processes import configure_logging, run_async, serve_workers
from .settings import Settings, SettingsError

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_VALID: Final = 3


def _cmd_create(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    response = client.create_key(
        args.owner,
        args.name,
        scopes=args.scope,
        resources=args.resource,
        prefix=args.prefix,
        ttl=args.ttl,
        expire_time=args.expire_time,
        rate_limit_per_minute=args.rate_limit,
        metadata=args.metadata,
        **create_options(args),
    )
    if args.json:
        print_json({"key": key_dict(response.key), "secret": response.secret}, out)
    else:
        print_key(response.key, out)
        out.write(f"\nsecret: {response.secret}\n")
        out.write("Store the secret now: it is shown this once and cannot be recovered.\n")
    return 0


def _cmd_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    show_key(client.get_key(args.id), args.json, out)
    return 0


def _cmd_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.all:
        keys = list(
            client.iter_keys(
                args.owner,
                include_inactive=args.include_inactive,
                page_size=500,
                created_by=args.created_by,
                secret_hint=args.hint,
            )
        )
        token = ""
    else:
        page = client.list_keys(
            args.owner,
            page_size=args.page_size,
            page_token=args.page_token,
            include_inactive=args.include_inactive,
            created_by=args.created_by,
            secret_hint=args.hint,
        )
        keys, token = list(page.keys), page.next_page_token
    if args.json:
        print_json({"keys": [key_dict(k) for k in keys], "next_page_token": token}, out)
        return 0
    rows = [("ID", "NAME", "HINT", "STATE", "SCOPES", "CREATED", "EXPIRES")]
    rows += [
        (
            k.id,
            k.name,
            k.secret_hint,
            state_text(k),
            ",".join(k.scopes) or "-",
            time_text(k, "create_time"),
            time_text(k, "expire_time"),
        )
        for k in keys
    ]
    table(rows, out)
    if token:
        out.write(f"\nmore keys: --page-token {token}\n")
    return 0


def _cmd_revoke(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if not args.cascade:
        show_key(client.revoke_key(args.id, reason=args.reason), args.json, out)
        return 0
    response = client.revoke_keys(args.id, reason=args.reason)
    if args.json:
        print_json({"key": key_dict(response.key), "cascaded_ids": list(response.cascaded_ids)}, out)
        return 0
    print_key(response.key, out)
    out.write(f"\nalso revoked ({len(response.cascaded_ids)} keys it created, and theirs):\n")
    for key_id in response.cascaded_ids:
        out.write(f"  {key_id}\n")
    return 0


def _cmd_verify(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    secret = sys.stdin.readline().strip() if args.key == "-" else args.key
    response = client.verify_key(secret, required_scopes=args.scope, resource=args.resource)
    result = keys_pb2.VerifyResult.Name(response.result).removeprefix("VERIFY_RESULT_")
    if args.json:
        body: dict[str, Any] = {"result": result}
        if response.HasField("key"):
            body["key"] = key_dict(response.key)
        print_json(body, out)
    else:
        out.write(f"result: {result}\n")
        if response.HasField("key"):
            out.write(
                f"key:    {response.key.id} ({response.key.secret_hint}, owner {response.key.owner_id})\n"
            )
    return 0 if response.result == keys_pb2.VERIFY_RESULT_VALID else EXIT_NOT_VALID


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    settings = Settings.resolve(args, os.environ)
    configure_logging(settings.log_level)
    try:
        if settings.workers > 1:
            return serve_workers(settings)
        run_async(serve(settings))
    except OSError as exc:
        logging.getLogger("keystile").error("%s", exc)
        return EXIT_ERROR
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .embedded import EmbeddedPostgres
    from .store import migrate

    settings = Settings.resolve(args, os.environ)
    configure_logging(settings.log_level)
    embedded = None
    url = settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = embedded.start()
    try:
        applied = asyncio.run(migrate(url))
    except Exception as exc:
        if not isinstance(exc, _database_errors()):
            raise
        return _database_error("cannot migrate", exc)
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is up to date")
    return 0


def _database_errors() -> tuple[type[Exception], ...]:
    import psycopg  # the server extra's: imported by the commands that need the database

    return (psycopg.Error,)


def _database_error(what: str, exc: BaseException) -> int:
    """One line on stderr saying why the database could not be used (never a password)."""
    from .store.connections import describe_database_error

    sys.stderr.write(f"error: {what}: {describe_database_error(exc)}\n")
    return EXIT_ERROR


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import bootstrap_admin
    from .errors import AdminKeyExists, StoreUnavailable

    settings = Settings.resolve(args, os.environ)
    configure_logging("WARNING")
    unusable_database: tuple[type[Exception], ...] = (*_database_errors(), StoreUnavailable)
    try:
        created = asyncio.run(
            bootstrap_admin(settings, owner_id=args.owner, name=args.name, force=args.force)
        )
    except unusable_database as exc:
        return _database_error("cannot bootstrap", exc)
    except AdminKeyExists:
        if args.if_missing:
            print("keystile: an admin key already exists; not creating another (use your stored key)")
            return 0
        sys.stderr.write("error: an active admin key already exists; use --force to mint another\n")
        return EXIT_ERROR
    tls = "-cacert CA.pem" if settings.tls_cert else "-plaintext"
    body = json.dumps({"owner_id": created.key.owner_id})
    print(
        f"Admin key for owner {created.key.owner_id!r} (id {created.key.id}).\n"
        "It is shown this once: store it now (a password manager, or KEYSTILE_API_KEY for the CLI).\n\n"
        f"  {created.secret}\n\n"
        "Try it:\n"
        f"  grpcurl {tls} -H 'authorization: Bearer {created.secret}' -d '{body}' \\\n"
        f"    {settings.listen} keystile.v1.KeyService/ListKeys\n"
    )
    return 0


def _client_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("KEYSTILE_TARGET", "127.0.0.1:50051"),
        help="server address host:port (env KEYSTILE_TARGET; default 127.0.0.1:50051)",
    )
    common.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the caller's key (default: env KEYSTILE_API_KEY); sent as a Bearer token",
    )
    common.add_argument("--tls", action="store_true", help="connect over TLS with the system's CAs")
    common.add_argument("--tls-ca", type=Path, help="PEM CA bundle to trust (implies --tls)")
    common.add_argument("--tls-cert", type=Path, help="PEM client certificate for mTLS")
    common.add_argument("--tls-key", type=Path, help="PEM client private key for mTLS")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
    parser = argparse.ArgumentParser(prog="keystile", description="keystile API-key service")
    parser.add_argument("--version", action="version", version=f"keystile {keystile.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    Settings.add_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)

    bootstrap = commands.add_parser("bootstrap", help="create the first admin key and print it once")
    Settings.add_arguments(bootstrap)
    bootstrap.add_argument("--owner", default="admin", help="owner id of the admin key (default admin)")
    bootstrap.add_argument("--name", default="bootstrap admin", help="name of the admin key")
    once = bootstrap.add_mutually_exclusive_group()
    once.add_argument("--force", action="store_true", help="mint another even if an admin key exists")
    once.add_argument("--if-missing", action="store_true", help="exit quietly (0) if an admin key exists")
    bootstrap.set_defaults(handler=_cmd_bootstrap)

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    Settings.add_arguments(migrate)
    migrate.set_defaults(handler=_cmd_migrate)

    keys = commands.add_parser("keys", help="manage keys on a running server").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    common = _client_parser()

    create = keys.add_parser("create", parents=[common], help="create a key and print its secret once")
    create.add_argument("--owner", required=True, help="owner id")
    create.add_argument("--name", required=True, help="human-readable name")
    create.add_argument("--scope", action="append", default=[], help="granted scope (repeatable)")
    create.add_argument("--resource", action="append", default=[], help="allowed resource (repeatable)")
    create.add_argument("--prefix", default="", help="secret type prefix, e.g. sk_live")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=parse_duration, help="lifetime, e.g. 3600, 30m, 12h, 90d")
    expiry.add_argument("--expire-time", type=parse_timestamp, help="expiry instant, ISO 8601")
    create.add_argument("--rate-limit", type=int, default=0, help="requests per minute (0 = unlimited)")
    create.add_argument("--metadata", type=parse_json_object, default=None, help="JSON object")
    add_create_arguments(create)
    create.set_defaults(client_handler=_cmd_create)

    get = keys.add_parser("get", parents=[common], help="show one key")
    get.add_argument("id")
    get.set_defaults(client_handler=_cmd_get)

    lister = keys.add_parser("list", parents=[common], help="list an owner's keys, newest first")
    lister.add_argument("--owner", default="", help="owner id (admins may omit it: every owner's keys)")
    lister.add_argument("--created-by", default="", help="only keys created by this key id")
    lister.add_argument("--hint", default="", help="only keys with this secret hint (from a log line)")
    lister.add_argument("--include-inactive", action="store_true", help="also revoked and expired keys")
    lister.add_argument("--page-size", type=int, default=0, help="keys per page (default 50, max 500)")
    lister.add_argument("--page-token", default="", help="continue from a previous page")
    lister.add_argument("--all", action="store_true", help="fetch every page")
    lister.set_defaults(client_handler=_cmd_list)

    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("id")
    revoke.add_argument("--reason", default="", help="why (at most 500 characters)")
    revoke.add_argument(
        "--cascade", action="store_true", help="also revoke every key it created, and theirs (a leak)"
    )
    revoke.set_defaults(client_handler=_cmd_revoke)

    verify = keys.add_parser("verify", parents=[common], help="verify a key (exit 0 only when VALID)")
    verify.add_argument("key", help="the secret, or - to read it from stdin (keeps it out of ps)")
    verify.add_argument("--scope", action="append", default=[], help="required scope (repeatable)")
    verify.add_argument("--resource", default="", help="required resource")
    verify.set_defaults(client_handler=_cmd_verify)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="load-test VerifyKey on a running server",
        description="Create keys (with KEYSTILE_API_KEY, keys:write), send VerifyKey at the given "
        "concurrency for --duration seconds, and report calls/s and HdrHistogram latency percentiles.",
    )
    _bench_arguments(bench)
    bench.set_defaults(client_handler=_cmd_bench)
    add_key_commands(keys, common)
    add_commands(commands, common)
    add_audit_command(commands, common)
    add_import_command(commands, common)
    return parser


SERVER_EXTRA: Final = "pip install 'keystile[server]'"


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from .bench_command import add_arguments
    except ModuleNotFoundError:  # the client alone: the load generator comes with the server extra
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    add_arguments(parser)


def _cmd_bench(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    from .bench_command import run_command

    return run_command(client, args, out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``keystile`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        client_handler: Callable[[Client, argparse.Namespace, TextIO], int] | None = getattr(
            args, "client_handler", None
        )
        if client_handler is not None:
            api_key = (
                args.api_key_file.read_text(encoding="utf-8").strip()
                if args.api_key_file
                else os.environ.get("KEYSTILE_API_KEY") or None
            )
            args.api_key = api_key  # keystile bench hands it to its load processes
            client = Client(
                args.target,
                api_key=api_key,
                timeout=args.timeout,
                tls=args.tls,
                tls_ca=args.tls_ca,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
            )
            with client:
                return client_handler(client, args, out)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except SettingsError as exc:
        parser.error(str(exc))
    except ModuleNotFoundError as exc:  # only the client is installed
        sys.stderr.write(
            f"error: `keystile {args.command}` needs the server: {SERVER_EXTRA} ({exc.name} is missing)\n"
        )
        return EXIT_ERROR
    except KeystileError as exc:
        detail = "".join(f"\n  {field}: {why}" for field, why in exc.field_violations.items())
        sys.stderr.write(
            f"error: {exc.code.name}: {exc.message}"
            + (f" [{exc.reason}]" if exc.reason else "")
            + detail
            + "\n"
        )
        return EXIT_ERROR
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
