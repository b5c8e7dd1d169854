"""Server settings: built once, from command-line flags over ``KEYSTILE_*`` variables over defaults.

Each option is declared once in ``OPTIONS`` (flag, variable, type, default, help), which drives
argparse, the environment lookup and the README's configuration table alike. No other module
reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keystile._format import is_valid_prefix

from .key_formats import LegacyFormat, parse_legacy_formats

DEFAULT_LISTEN: Final = "127.0.0.1:50051"


class SettingsError(ValueError):
    """A flag or variable holds a value keystile cannot use."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _listen_address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT")
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _prefix(text: str) -> str:
    if not is_valid_prefix(text):
        raise ValueError("must be 1-16 characters of a-z 0-9 _ starting with a letter")
    return text


def _verify_auth(text: str) -> str:
    if text not in {"open", "required"}:
        raise ValueError("must be open or required")
    return text


MIN_ADMIN_KEY_LENGTH: Final = 32


MIN_ADMIN_KEY_BITS: Final = 64
_GENERATE_COMMAND: Final = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def looks_random(secret: str) -> bool:
    """Whether ``secret`` could plausibly be random: a screen for the obviously guessable.

    No test can prove a string random; this one refuses what a person types instead of
    generating: few distinct characters, a repeated pattern or word, or less than
    ``MIN_ADMIN_KEY_BITS`` of Shannon entropy over its characters. A hex or base64 secret of
    128 random bits or more passes.
    """
    counts = Counter(secret)
    length = len(secret)
    bits = -sum(n * math.log2(n / length) for n in counts.values())
    periodic = any(secret[p:] == secret[:-p] for p in range(1, length // 2 + 1))
    grams = [secret[i : i + 4] for i in range(length - 3)]
    repetitive = len(set(grams)) < 0.75 * len(grams)  # "password-password-..." and the like
    return len(counts) >= 6 and bits >= MIN_ADMIN_KEY_BITS and not periodic and not repetitive


def _admin_key(text: str) -> str:
    secret = text.strip()
    if len(secret) < MIN_ADMIN_KEY_LENGTH:
        raise ValueError(f"must be at least {MIN_ADMIN_KEY_LENGTH} characters")
    if not looks_random(secret):
        raise ValueError(f"is too predictable to guard every key; generate one: {_GENERATE_COMMAND}")
    return secret


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must not be negative")
    return value


OUTAGE_MODES: Final = ("fail-closed", "serve-cached")


def _outage_mode(text: str) -> str:
    if text not in OUTAGE_MODES:
        raise ValueError("must be fail-closed or serve-cached")
    return text


def _on_off(text: str) -> bool:
    if text.lower() not in {"on", "off", "true", "false", "1", "0"}:
        raise ValueError("must be on or off")
    return text.lower() in {"on", "true", "1"}


_HEADER_NAME: Final = re.compile(r"\A[a-z0-9][a-z0-9-]*\Z")


def _header_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if not names or not all(_HEADER_NAME.match(name) for name in names):
        raise ValueError("must be comma-separated header names")
    return names


def _header_prefix(text: str) -> str:
    prefix = text.strip().lower()
    if not re.match(r"\A[a-z0-9][a-z0-9-]*\Z", prefix):
        raise ValueError("must be a header name prefix such as x-keystile-")
    return prefix


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be debug, info, warning or error")
    return level


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its field name, how it is parsed, and what it means."""

    field: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        """The command-line flag, such as ``--database-url``."""
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, such as ``KEYSTILE_DATABASE_URL``."""
        return "KEYSTILE_" + self.field.upper()


OPTIONS: Final = (
    Option("database_url", str, None, "PostgreSQL URL; unset starts an embedded PostgreSQL", "URL"),
    Option("data_dir", Path, Path(".keystile"), "where the embedded PostgreSQL keeps its data", "DIR"),
    Option("listen", str, DEFAULT_LISTEN, "host:port the gRPC server binds", "HOST:PORT"),
    Option("pool_min_size", _positive_int, 2, "database connections kept open", "N"),
    Option("pool_max_size", _positive_int, 10, "most database connections at once", "N"),
    Option(
        "db_timeout",
        _positive_float,
        5.0,
        "seconds any database operation may take (connection, statement, dead-peer detection)",
        "SECONDS",
    ),
    Option(
        "on_database_outage",
        _outage_mode,
        "fail-closed",
        "while the database is unreachable: fail-closed (UNAVAILABLE), or serve-cached (cached "
        "verdicts, never older than --max-staleness)",
        "MODE",
    ),
    Option(
        "max_pending_lookups",
        _positive_int,
        1000,
        "distinct keys waiting for the database at once; beyond it a miss is UNAVAILABLE at once",
        "N",
    ),
    Option("default_prefix", _prefix, "ks", "type prefix of new secrets when CreateKey names none", "PREFIX"),
    Option("usage_flush_interval", _positive_float, 1.0, "seconds between last_used_time writes", "SECONDS"),
    Option(
        "health_check_interval", _positive_float, 2.0, "seconds between database health probes", "SECONDS"
    ),
    Option(
        "shutdown_grace",
        _positive_float,
        10.0,
        "seconds in-flight calls get to finish on shutdown",
        "SECONDS",
    ),
    Option("workers", _positive_int, 1, "server processes sharing the port (SO_REUSEPORT)", "N"),
    Option(
        "cache_max_entries",
        _non_negative_int,
        100_000,
        "keys the verification cache holds per process; 0 turns the cache off",
        "N",
    ),
    Option(
        "negative_cache_max_entries",
        _non_negative_int,
        10_000,
        "unknown key hashes remembered per process; 0 remembers none",
        "N",
    ),
    Option(
        "key_filter",
        _on_off,
        True,
        "keep a filter of every stored key hash in memory (about 2-4 bytes a key), so unknown keys "
        "cost no query; off: look each one up",
        "on|off",
    ),
    Option(
        "max_staleness",
        _positive_float,
        30.0,
        "oldest cached verdict ever served, whatever fails (server and client caches)",
        "SECONDS",
    ),
    Option(
        "max_watchers",
        _positive_int,
        1000,
        "WatchKeyEvents streams per process; beyond it RESOURCE_EXHAUSTED",
        "N",
    ),
    Option("max_concurrent_streams", _positive_int, 1000, "concurrent calls per connection", "N"),
    Option(
        "max_connection_idle",
        _positive_float,
        60.0,
        "seconds a connection without calls stays open (forward-auth: also one with an unfinished request)",
        "SECONDS",
    ),
    Option(
        "max_connection_age",
        _non_negative_float,
        3600.0,
        "seconds before a connection is asked to reconnect (0: never); it gets 30 s to finish its calls",
        "SECONDS",
    ),
    Option(
        "handshake_timeout",
        _positive_float,
        10.0,
        "seconds a new connection has to complete its TLS and HTTP/2 set-up",
        "SECONDS",
    ),
    Option(
        "keepalive_time",
        _positive_float,
        60.0,
        "seconds of silence before the server pings a client to see that it is still there",
        "SECONDS",
    ),
    Option(
        "keepalive_timeout",
        _positive_float,
        20.0,
        "seconds a client has to answer that ping before its connection is closed",
        "SECONDS",
    ),
    Option(
        "metrics_listen", _listen_address, None, "host:port for Prometheus /metrics; unset: off", "HOST:PORT"
    ),
    Option("log_level", _log_level, "INFO", "debug, info, warning or error", "LEVEL"),
    Option("verify_auth", _verify_auth, "open", "VerifyKey callers: open, or required (keys:verify)", "MODE"),
    Option(
        "admin_key",
        _admin_key,
        None,
        "static admin secret, at least 32 characters (prefer the file)",
        "SECRET",
    ),
    Option("admin_key_file", Path, None, "file holding the static admin secret", "FILE"),
    Option("tls_cert", Path, None, "PEM certificate chain: serve TLS", "FILE"),
    Option("tls_key", Path, None, "PEM private key for --tls-cert", "FILE"),
    Option("tls_client_ca", Path, None, "PEM CA bundle: require client certificates (mTLS)", "FILE"),
    Option(
        "http_listen",
        _listen_address,
        None,
        "host:port of the HTTP forward-auth endpoint /auth (nginx auth_request, Traefik, Caddy); unset: off",
        "HOST:PORT",
    ),
    Option(
        "auth_key_headers",
        _header_names,
        ("authorization", "x-api-key"),
        "gateways (Envoy ext_authz): headers that may carry the key, in order; authorization as Bearer",
        "NAMES",
    ),
    Option(
        "auth_key_query",
        str,
        "",
        "gateways: a query parameter that may carry the key (off when empty)",
        "NAME",
    ),
    Option(
        "auth_header_prefix",
        _header_prefix,
        "x-keystile-",
        "gateways: prefix of the key-id, owner-id and scopes headers sent to the upstream",
        "PREFIX",
    ),
    Option(
        "auth_strip_credential",
        _on_off,
        True,
        "gateways: remove the header that carried the key before the request goes upstream",
        "on|off",
    ),
    Option(
        "legacy_key_formats",
        parse_legacy_formats,
        (),
        "imported keys' formats that are looked up, as PREFIX=REGEX separated by spaces "
        "(e.g. 'wm_=[A-Za-z0-9]{32}'); anything else that is not a keystile key is MALFORMED",
        "FORMATS",
    ),
    Option(
        "key_retention_days",
        _non_negative_int,
        0,
        "delete keys revoked or expired more than this many days ago (hourly; audit events stay); 0: keep",
        "DAYS",
    ),
    Option(
        "audit_retention_days",
        _non_negative_int,
        0,
        "delete audit events older than this many days (hourly); 0: keep them all",
        "DAYS",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs to know, resolved and validated."""

    database_url: str | None = None
    data_dir: Path = Path(".keystile")
    listen: str = DEFAULT_LISTEN
    pool_min_size: int = 2
    pool_max_size: int = 10
    db_timeout: float = 5.0
    on_database_outage: str = "fail-closed"
    max_pending_lookups: int = 1000
    default_prefix: str = "ks"
    usage_flush_interval: float = 1.0
    health_check_interval: float = 2.0
    shutdown_grace: float = 10.0
    workers: int = 1
    cache_max_entries: int = 100_000
    negative_cache_max_entries: int = 10_000
    key_filter: bool = True
    max_staleness: float = 30.0
    max_watchers: int = 1000
    max_concurrent_streams: int = 1000
    max_connection_idle: float = 60.0
    max_connection_age: float = 3600.0
    handshake_timeout: float = 10.0
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    metrics_listen: str | None = None
    log_level: str = "INFO"
    verify_auth: str = "open"
    admin_key: str | None = field(default=None, repr=False)
    admin_key_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    http_listen: str | None = None
    auth_key_headers: tuple[str, ...] = ("authorization", "x-api-key")
    auth_key_query: str = ""
    auth_header_prefix: str = "x-keystile-"
    auth_strip_credential: bool = True
    legacy_key_formats: tuple[LegacyFormat, ...] = ()
    key_retention_days: int = 0
    audit_retention_days: int = 0

    def __post_init__(self) -> None:
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError("pool_min_size must not exceed pool_max_size")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.admin_key is not None and self.admin_key_file is not None:
            raise SettingsError("give KEYSTILE_ADMIN_KEY or KEYSTILE_ADMIN_KEY_FILE, not both")

    def exposed_secret_files(self) -> list[str]:
        """Warnings for files holding secrets (TLS key, admin key) that other users may read."""
        warnings = []
        for flag, path in (("--tls-key", self.tls_key), ("--admin-key-file", self.admin_key_file)):
            if path is None:
                continue
            try:
                mode = path.stat().st_mode
            except OSError:
                continue  # reading it fails with its own clear error
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                warnings.append(
                    f"{flag} {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                    f"restrict it: chmod 600 {path}"
                )
        return warnings

    def static_admin_key(self) -> str | None:
        """The static admin secret, read from its file when one is named (never logged)."""
        if self.admin_key_file is None:
            return self.admin_key
        try:
            return _admin_key(self.admin_key_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(
                f"--admin-key-file: cannot read {self.admin_key_file}: {exc.strerror}"
            ) from exc
        except ValueError as exc:
            raise SettingsError(f"--admin-key-file: {exc}") from exc

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per option; flags default to None so that variables can fill the gaps."""
        for option in OPTIONS:
            parser.add_argument(
                option.flag,
                dest=option.field,
                default=None,
                metavar=option.metavar,
                help=f"{option.help} (env {option.env})",
            )

    @classmethod
    def resolve(cls, args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
        """Flags win over variables, variables over defaults; every value is parsed and checked."""
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = getattr(args, option.field, None) if args is not None else None
            source = option.flag
            if raw is None and environ.get(option.env):
                raw, source = environ[option.env], option.env
            if raw is None:
                continue
            try:
                values[option.field] = option.parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{source}: {exc}") from exc
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI use this)."""
        return dataclasses.replace(self, **changes)
