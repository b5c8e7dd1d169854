"""The CLI's limit commands: ``keys create --limit/--credits``, ``policy ...`` and ``credits ...``.

Kept beside ``cli`` (which wires them in) so that each reads on its own: parsing a limit
(``NAME=COUNT/WINDOW[+BURST]``, e.g. ``second=10/1s`` or ``day=10000/1d+500``) and printing
policies and balances.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final, TextIO

from google.protobuf import json_format

from keystile import Client, credits, owner_policy, rate_limit
from keystile.v1 import keys_pb2

_DURATION_RE: Final = re.compile(r"\A(\d+)([smhdw]?)\Z")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d`` or ``2w`` as a timedelta."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 3600, 30m, 12h, 7d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


_LIMIT_RE: Final = re.compile(r"\A([a-z][a-z0-9_-]*)=(\d+)/([^+]+)(?:\+(\d+))?\Z")

Handler = Callable[[Client, argparse.Namespace, TextIO], int]


def parse_limit(text: str) -> keys_pb2.RateLimit:
    """``NAME=COUNT/WINDOW[+BURST]``: ``second=10/1s``, ``day=10000/1d+500``."""
    match = _LIMIT_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid limit {text!r} (use NAME=COUNT/WINDOW[+BURST], e.g. second=10/1s or day=10000/1d+500)"
        )
    window = parse_duration(match[3])
    return rate_limit(match[1], int(match[2]), window, burst=int(match[4] or 0))


def add_create_arguments(create: argparse.ArgumentParser) -> None:
    """``keys create``'s limit options."""
    create.add_argument(
        "--limit",
        type=parse_limit,
        action="append",
        default=[],
        help="rate limit NAME=COUNT/WINDOW[+BURST] (repeatable)",
    )
    create.add_argument("--credits", type=int, default=None, help="uses the key may spend")
    create.add_argument(
        "--refill", choices=("daily", "monthly"), default="", help="reset the credits every day or month"
    )
    create.add_argument("--refill-amount", type=int, default=0, help="what --refill resets the credits to")


def create_options(args: argparse.Namespace) -> dict[str, Any]:
    """``create_key`` keyword arguments from ``add_create_arguments``' options."""
    options: dict[str, Any] = {"limits": args.limit}
    if args.credits is not None or args.refill:
        options["credits"] = credits(args.credits or 0, refill=args.refill, refill_amount=args.refill_amount)
    return options


def limits_text(limits: Any) -> str:
    """Limits as the CLI writes them."""
    parts = []
    for limit in limits:
        seconds = limit.window.ToTimedelta().total_seconds()
        parts.append(f"{limit.name}={limit.limit}/{seconds:g}s" + (f"+{limit.burst}" if limit.burst else ""))
    return " ".join(parts) or "-"


def _print(message: Any, args: argparse.Namespace, out: TextIO, rows: list[tuple[str, str]]) -> None:
    if args.json:
        out.write(
            json.dumps(
                json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True
            )
            + "\n"
        )
        return
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        out.write(f"{label.ljust(width)}  {value}\n")


def _policy_rows(policy: keys_pb2.OwnerPolicy) -> list[tuple[str, str]]:
    lifetime = policy.max_key_lifetime.ToTimedelta() if policy.HasField("max_key_lifetime") else None
    return [
        ("owner", policy.owner_id),
        ("max active keys", str(policy.max_active_keys or "no limit")),
        ("max key lifetime", str(lifetime) if lifetime else "no limit"),
        ("shared limits", limits_text(policy.limits)),
    ]


def _credit_rows(balance: keys_pb2.Credits) -> list[tuple[str, str]]:
    refill = keys_pb2.CreditRefill.Name(balance.refill).removeprefix("CREDIT_REFILL_").lower()
    return [
        ("remaining", str(balance.remaining)),
        ("refill", "never" if refill == "unspecified" else f"{refill}, to {balance.refill_amount}"),
    ]


def _policy_set(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    policy = client.set_owner_policy(
        owner_policy(
            args.owner,
            max_active_keys=args.max_active_keys,
            max_key_lifetime=args.max_key_lifetime,
            limits=args.limit,
        )
    )
    _print(policy, args, out, _policy_rows(policy))
    return 0


def _policy_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    policy = client.get_owner_policy(args.owner)
    _print(policy, args, out, _policy_rows(policy))
    return 0


def _policy_delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    client.delete_owner_policy(args.owner)
    if not args.json:
        out.write(f"policy of {args.owner} deleted\n")
    return 0


def _credits_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    balance = client.get_credits(args.id)
    _print(balance, args, out, _credit_rows(balance))
    return 0


def _credits_change(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.credits_command == "set":
        balance = client.update_credits(args.id, set_to=args.amount)
    else:
        balance = client.update_credits(args.id, add=args.amount)
    _print(balance, args, out, _credit_rows(balance))
    return 0


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """``keystile policy set|get|delete`` and ``keystile credits get|set|add``."""
    policy = commands.add_parser("policy", help="an owner's policy: key quota, key lifetime, shared limits")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    setter = actions.add_parser("set", parents=[common], help="replace an owner's policy (admin)")
    setter.add_argument("--owner", required=True, help="owner id")
    setter.add_argument("--max-active-keys", type=int, default=0, help="most active keys (0 = no limit)")
    setter.add_argument(
        "--max-key-lifetime", type=parse_duration, default=None, help="e.g. 90d: keys must expire"
    )
    setter.add_argument(
        "--limit", type=parse_limit, action="append", default=[], help="shared limit (repeatable)"
    )
    setter.set_defaults(client_handler=_policy_set)
    for name, handler, text in (("get", _policy_get, "show"), ("delete", _policy_delete, "remove (admin)")):
        action = actions.add_parser(name, parents=[common], help=f"{text} an owner's policy")
        action.add_argument("--owner", required=True, help="owner id")
        action.set_defaults(client_handler=handler)

    balance = commands.add_parser("credits", help="a key's credit balance")
    actions = balance.add_subparsers(dest="credits_command", required=True, metavar="ACTION")
    getter = actions.add_parser("get", parents=[common], help="show a key's credits")
    getter.add_argument("id")
    getter.set_defaults(client_handler=_credits_get)
    for name, text in (("set", "set a key's balance (admin)"), ("add", "add to a key's balance (admin)")):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("id")
        action.add_argument("amount", type=int)
        action.set_defaults(client_handler=_credits_change)
