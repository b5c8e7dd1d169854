"""``keystile import``: existing keys, by hash, from JSON lines or CSV, in batches of ImportKeys.

Each row is an object (a JSON line, or a CSV record under its header) whose fields are
ImportedKey's: ``secret_hash`` (hex or base64), ``owner_id``, ``name``, ``scopes`` and
``resources`` (a list, or text separated by commas or spaces), ``secret_hint``, ``prefix``,
``create_time``, ``expire_time``, ``revoke_time``, ``last_used_time`` (RFC 3339, or epoch
seconds), ``revoke_reason``, ``limits`` (a list of ``NAME=COUNT/WINDOW[+BURST]``), ``metadata``
(an object, or its JSON text), ``disabled`` (true/false) and ``rate_limit_per_minute``. Empty
values and JSON nulls are unset. ``--map FIELD=COLUMN[:CONVERSION]`` reads a field from another
column (conversions: ``ms`` and ``s`` for epoch times, ``not`` to negate a boolean such as
``is_active``, ``json`` for JSON text), and ``--set FIELD=VALUE`` gives every row one value.

Every row is reported: imported, or why not. The command exits 0 when no row was invalid (keys
already stored are reported and skipped, so a re-run is safe), and 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from keystile import Client
from keystile.v1 import keys_pb2

from .cli_limits import parse_limit
from .cli_output import print_json

BATCH: Final = 500
_TIMES: Final = ("create_time", "expire_time", "revoke_time", "last_used_time")
_LISTS: Final = ("scopes", "resources")
_TEXT: Final = ("secret_hash", "owner_id", "name", "secret_hint", "prefix", "revoke_reason")
FIELDS: Final = (*_TEXT, *_LISTS, *_TIMES, "limits", "metadata", "disabled", "rate_limit_per_minute")
_CONVERSIONS: Final = ("ms", "s", "not", "json")
ColumnMap = dict[str, tuple[str, str]]
"""--map: each field's column and conversion."""


class RowError(ValueError):
    """A row that cannot become an ImportedKey: the field, and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def read_rows(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    """The file's rows as objects: JSON lines, or CSV records under their header."""
    with path.open(newline="", encoding="utf-8") as handle:
        if kind == "csv":
            yield from csv.DictReader(handle)
            return
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{path}:{number}: each line must be a JSON object")
            yield row


def _time(value: Any, field: str, unit: str = "s") -> datetime:
    if isinstance(value, int | float) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        seconds = float(value) / (1000 if unit == "ms" else 1)
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RowError(field, f"{value!r} is not an RFC 3339 time or epoch seconds") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(item) for item in value]
    text = str(value).strip()
    if text.startswith("{") and text.endswith("}"):  # a PostgreSQL array's text form
        text = text[1:-1]
    return [item.strip().strip('"') for item in text.replace(",", " ").split() if item.strip()]


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "1", "yes"):
        return True
    if text in ("false", "f", "0", "no"):
        return False
    raise RowError(field, f"{value!r} is not true or false")


def _value(row: dict[str, Any], field: str, mapping: ColumnMap, fixed: dict[str, str]) -> Any:
    """The row's value for ``field``: fixed by --set, mapped by --map, or the same-named column."""
    if field in fixed:
        return fixed[field]
    column, conversion = mapping.get(field, (field, ""))
    value = row.get(column)
    if value is None or value == "":
        return None
    if conversion == "json" and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RowError(field, "is not JSON") from None
    if conversion == "not":
        return not _bool(value, field)
    if conversion in ("ms", "s"):
        return _time(value, field, conversion)
    return value


def imported_key(row: dict[str, Any], mapping: ColumnMap, fixed: dict[str, str]) -> keys_pb2.ImportedKey:
    """One row as an ImportedKey (RowError when a value cannot be read)."""
    key = keys_pb2.ImportedKey()
    for field in FIELDS:
        value = _value(row, field, mapping, fixed)
        if value is None:
            continue
        if field in _TEXT:
            setattr(key, field, str(value))
        elif field in _LISTS:
            getattr(key, field).extend(_list(value))
        elif field in _TIMES:
            getattr(key, field).FromDatetime(value if isinstance(value, datetime) else _time(value, field))
        elif field == "limits":
            try:
                key.limits.extend(parse_limit(str(item)) for item in _list(value))
            except argparse.ArgumentTypeError as exc:
                raise RowError(field, str(exc)) from None
        elif field == "metadata":
            metadata = json.loads(value) if isinstance(value, str) else value
            if not isinstance(metadata, dict):
                raise RowError(field, "must be a JSON object")
            key.metadata.update(metadata)
        elif field == "disabled":
            key.disabled = _bool(value, field)
        else:
            try:
                key.rate_limit_per_minute = int(value)
            except (TypeError, ValueError):
                raise RowError(field, f"{value!r} is not a whole number") from None
    return key


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in FIELDS:
            raise SystemExit(f"{flag} {item!r}: use FIELD=... with FIELD one of {', '.join(FIELDS)}")
        pairs[field] = value
    return pairs


def _mapping(items: list[str]) -> ColumnMap:
    mapping = {}
    for field, source in _pairs(items, "--map").items():
        column, _, conversion = source.partition(":")
        if not column or conversion not in ("", *_CONVERSIONS):
            raise SystemExit(f"--map {field}={source}: use COLUMN[:{'|'.join(_CONVERSIONS)}]")
        mapping[field] = (column, conversion)
    return mapping


def run_import(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``keystile import``: read, convert, send in batches, report every row."""
    path = Path(args.file)
    kind = args.format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    mapping, fixed = _mapping(args.map), _pairs(args.set, "--set")
    results: list[dict[str, Any]] = []
    batch: list[tuple[int, keys_pb2.ImportedKey]] = []

    def send() -> None:
        response = client.import_keys([key for _, key in batch])
        for (number, _), result in zip(batch, response.results, strict=True):
            results.append(
                {"row": number, "id": result.id, "error": result.error, "fields": list(result.fields)}
            )
        batch.clear()

    for number, row in enumerate(read_rows(path, kind), 1):
        try:
            batch.append((number, imported_key(row, mapping, fixed)))
        except RowError as exc:
            results.append({"row": number, "id": "", "error": f"invalid {exc}", "fields": [exc.field]})
        if len(batch) >= args.batch_size:
            send()
    if batch:
        send()
    imported = sum(1 for r in results if r["id"])
    duplicates = sum(1 for r in results if "already stored" in r["error"])
    invalid = len(results) - imported - duplicates
    if args.json:
        print_json(
            {"imported": imported, "already_stored": duplicates, "refused": invalid, "rows": results}, out
        )
    else:
        for result in results:
            if result["error"]:
                out.write(f"row {result['row']}: {result['error']}\n")
        out.write(
            f"imported {imported} of {len(results)} keys; {duplicates} already stored, {invalid} refused\n"
        )
    return 0 if invalid == 0 else 1


def add_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """``keystile import FILE``."""
    command = commands.add_parser(
        "import",
        parents=[common],
        help="import existing keys by hash from JSON lines or CSV (admin)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("file", help="JSON lines (.jsonl) or CSV (.csv) with a header")
    command.add_argument("--format", choices=("jsonl", "csv"), default="", help="instead of the extension")
    command.add_argument(
        "--map", action="append", default=[], help="FIELD=COLUMN[:ms|s|not|json] (repeatable)"
    )
    command.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every row (repeatable)")
    command.add_argument("--batch-size", type=int, default=BATCH, help=f"keys per request (default {BATCH})")
    command.set_defaults(client_handler=run_import)
