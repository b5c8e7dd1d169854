"""Server settings: built once, from command-line flags over ``KEYSTILE_*`` variables over defaults.

Each option is declared once in ``OPTIONS`` (flag, variable, type, default, help), which drives
argparse, the environment lookup and the README's configuration table alike. No other module
reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keystile._format import is_valid_prefix

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


def _admin_key(text: str) -> str:
    if len(text.strip()) < MIN_ADMIN_KEY_LENGTH:
        raise ValueError(f"must be at least {MIN_ADMIN_KEY_LENGTH} characters")
    return text.strip()


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
    Option("db_timeout", _positive_float, 5.0, "seconds to wait for a database connection", "SECONDS"),
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
        "max_staleness",
        _positive_float,
        30.0,
        "oldest cached verdict ever served, whatever fails (server and client caches)",
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
    default_prefix: str = "ks"
    usage_flush_interval: float = 1.0
    health_check_interval: float = 2.0
    shutdown_grace: float = 10.0
    workers: int = 1
    cache_max_entries: int = 100_000
    negative_cache_max_entries: int = 10_000
    max_staleness: float = 30.0
    metrics_listen: str | None = None
    log_level: str = "INFO"
    verify_auth: str = "open"
    admin_key: str | None = field(default=None, repr=False)
    admin_key_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError("pool_min_size must not exceed pool_max_size")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.admin_key is not None and self.admin_key_file is not None:
            raise SettingsError("give KEYSTILE_ADMIN_KEY or KEYSTILE_ADMIN_KEY_FILE, not both")

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
