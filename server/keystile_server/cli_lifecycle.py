"""The CLI's lifecycle commands: ``keys update|disable|enable|roll|delete`` and ``audit``.

Kept beside ``cli`` (which wires them in). ``keys update`` changes only the fields given;
``keys roll`` prints the new secret once, like ``keys create``; ``audit`` lists management
events newest first (``--all`` for every page).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf import json_format

from keystile import Client
from keystile.v1 import keys_pb2

from .cli_limits import parse_duration, parse_limit
from .cli_output import key_dict, parse_json_object, parse_timestamp, print_json, show_key, table


def _expiry(text: str) -> datetime | None:
    """An ISO 8601 instant, or ``never``."""
    return None if text == "never" else parse_timestamp(text)


def _list(text: str) -> list[str]:
    """``a,b,c`` as a list; ``""`` as none."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _update(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    fields: dict[str, Any] = {}
    for name in ("name", "scopes", "resources", "metadata"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.expires is not None:
        fields["expire_time"] = args.expires
    if args.limit or args.no_limits:
        fields["limits"] = args.limit
    if not fields:
        raise SystemExit("keys update: nothing to change (give --name, --scopes, --resources, ...)")
    show_key(client.update_key(args.id, **fields), args.json, out)
    return 0


def _switch(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    show_key(client.update_key(args.id, disabled=args.keys_command == "disable"), args.json, out)
    return 0


def _roll(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    rolled = client.roll_key(args.id, grace_period=args.grace)
    if args.json:
        body = {"key": key_dict(rolled.key), "secret": rolled.secret, "replaced": key_dict(rolled.replaced)}
        print_json(body, out)
        return 0
    show_key(rolled.key, False, out)
    ends = rolled.replaced.expire_time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
    out.write(f"\nsecret: {rolled.secret}\n")
    out.write("Store the secret now: it is shown this once and cannot be recovered.\n")
    out.write(f"The old secret ({rolled.replaced.secret_hint}) stops working at {ends} UTC.\n")
    return 0


def _delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    client.delete_key(args.id)
    if not args.json:
        out.write(f"key {args.id} deleted\n")
    return 0


def _change_text(event: keys_pb2.AuditEvent) -> str:
    parts = []
    for change in event.changes:
        old = json.dumps(json_format.MessageToDict(change.old_value))
        new = json.dumps(json_format.MessageToDict(change.new_value))
        parts.append(f"{change.field}: {old} -> {new}")
    return "; ".join(parts) or "-"


def _audit(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    filters: dict[str, Any] = {
        "owner_id": args.owner,
        "key_id": args.key,
        "actor_key_id": args.actor,
        "start_time": args.since,
        "end_time": args.until,
    }
    if args.all:
        events, token = list(client.iter_audit_events(**filters, page_size=500)), ""
    else:
        page = client.list_audit_events(**filters, page_size=args.page_size, page_token=args.page_token)
        events, token = list(page.events), page.next_page_token
    if args.json:
        body = [json_format.MessageToDict(e, preserving_proto_field_name=True) for e in events]
        print_json({"events": body, "next_page_token": token}, out)
        return 0
    rows = [("TIME", "ACTION", "ACTOR", "KEY", "OWNER", "CHANGES")]
    rows += [
        (
            e.event_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            e.action,
            e.actor_key_id,
            e.key_id or "-",
            e.owner_id or "-",
            _change_text(e),
        )
        for e in events
    ]
    table(rows, out)
    if token:
        out.write(f"\nmore events: --page-token {token}\n")
    return 0


def add_key_commands(keys: Any, common: argparse.ArgumentParser) -> None:
    """``keystile keys update|disable|enable|roll|delete``."""
    update = keys.add_parser("update", parents=[common], help="change a key's fields (only those given)")
    update.add_argument("id")
    update.add_argument("--name", help="new name")
    update.add_argument("--scopes", type=_list, help='comma-separated scopes ("" for none)')
    update.add_argument("--resources", type=_list, help='comma-separated resources ("" for any)')
    update.add_argument("--metadata", type=parse_json_object, help="JSON object (replaces the old one)")
    update.add_argument("--expires", type=_expiry, help="ISO 8601 instant, or never")
    update.add_argument(
        "--limit", type=parse_limit, action="append", default=[], help="rate limits (replace all)"
    )
    update.add_argument("--no-limits", action="store_true", help="remove every rate limit")
    update.set_defaults(client_handler=_update)
    for name, text in (
        ("disable", "switch a key off (reversible)"),
        ("enable", "switch a disabled key back on"),
    ):
        switch = keys.add_parser(name, parents=[common], help=text)
        switch.add_argument("id")
        switch.set_defaults(client_handler=_switch)
    roll = keys.add_parser("roll", parents=[common], help="new secret for a key; the old one lasts --grace")
    roll.add_argument("id")
    roll.add_argument("--grace", type=parse_duration, default=None, help="e.g. 1h: the old secret's overlap")
    roll.set_defaults(client_handler=_roll)
    delete = keys.add_parser("delete", parents=[common], help="delete a revoked or expired key for good")
    delete.add_argument("id")
    delete.set_defaults(client_handler=_delete)


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """``keystile audit``."""
    audit = commands.add_parser("audit", parents=[common], help="list management events, newest first")
    audit.add_argument("--owner", default="", help="owner acted on (non-admins: their own)")
    audit.add_argument("--key", default="", help="key id acted on")
    audit.add_argument("--actor", default="", help="the caller's key id")
    audit.add_argument("--since", type=parse_timestamp, default=None, help="ISO 8601: from this instant")
    audit.add_argument("--until", type=parse_timestamp, default=None, help="ISO 8601: before this instant")
    audit.add_argument("--page-size", type=int, default=0, help="events per page (default 50, max 500)")
    audit.add_argument("--page-token", default="", help="continue from a previous page")
    audit.add_argument("--all", action="store_true", help="fetch every page")
    audit.set_defaults(client_handler=_audit)
