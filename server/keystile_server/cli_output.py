"""How the CLI reads arguments and prints keys: shared by ``cli`` and ``cli_lifecycle``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from google.protobuf import json_format

from keystile.v1 import keys_pb2

from .cli_limits import limits_text


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 instant; without an offset it is taken as UTC."""
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid timestamp {text!r} (use ISO 8601)") from exc


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("metadata must be a JSON object")
    return value


def key_dict(key: keys_pb2.Key) -> dict[str, Any]:
    """A key as ``--json`` prints it (the proto field names)."""
    return json_format.MessageToDict(key, preserving_proto_field_name=True)


def state_text(key: keys_pb2.Key) -> str:
    """``active``, ``revoked``, ``expired`` or ``disabled``."""
    return keys_pb2.KeyState.Name(key.state).removeprefix("KEY_STATE_").lower()


def time_text(key: keys_pb2.Key, field: str) -> str:
    """A key's timestamp field as UTC text, or ``-`` when unset."""
    if not key.HasField(field):  # type: ignore[arg-type]
        return "-"
    stamp: datetime = getattr(key, field).ToDatetime()
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Rows in aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def print_key(key: keys_pb2.Key, out: TextIO) -> None:
    """One key as a two-column table."""
    rows = [
        ("id", key.id),
        ("owner", key.owner_id),
        ("name", key.name),
        ("hint", key.secret_hint),
        ("state", state_text(key)),
        ("scopes", " ".join(key.scopes) or "-"),
        ("resources", " ".join(key.resources) or "(any)"),
        ("rate limits", limits_text(key.limits) if key.limits else "unlimited"),
        ("credits", _credit_terms(key) if key.HasField("credits") else "-"),
        ("created", time_text(key, "create_time")),
        ("expires", time_text(key, "expire_time")),
        ("revoked", time_text(key, "revoke_time") + (f" ({key.revoke_reason})" if key.revoke_reason else "")),
        ("last used", time_text(key, "last_used_time")),
        ("created by", key.created_by or "-"),
    ]
    if key.replaces:
        rows.append(("replaces", key.replaces))
    if key.replaced_by:
        rows.append(("replaced by", key.replaced_by))
    if key.metadata.fields:
        rows.append(("metadata", json.dumps(json_format.MessageToDict(key.metadata), sort_keys=True)))
    table(rows, out)


def _credit_terms(key: keys_pb2.Key) -> str:
    refill = keys_pb2.CreditRefill.Name(key.credits.refill).removeprefix("CREDIT_REFILL_").lower()
    amount = key.credits.refill_amount
    return "metered" + (f", refilled {refill} to {amount}" if amount else "")


def print_json(value: Any, out: TextIO) -> None:
    """``value`` as indented, sorted JSON."""
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def show_key(key: keys_pb2.Key, json_output: bool, out: TextIO) -> None:
    """A key as JSON (``--json``) or as a table."""
    if json_output:
        print_json(key_dict(key), out)
    else:
        print_key(key, out)
