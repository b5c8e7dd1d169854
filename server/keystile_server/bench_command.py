"""``keystile bench``'s command: create the keys a mix needs, run the load, report, clean up."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from keystile import Client

from .bench import LoadSpec, run_load
from .bench_requests import check_requests, health_requests, mixed_keys, parse_mix, verify_requests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``keystile bench`` flags (target, TLS, key and --json come from the shared client options)."""
    parser.add_argument(
        "--rpc",
        choices=("verify", "check", "health"),
        default="verify",
        help="what to call: VerifyKey, Envoy's ext_authz Check (route scope bench:verify), or the no-op",
    )
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="calls in flight in total")
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--processes", "-p", type=int, default=1, help="load processes (one connection each)")
    parser.add_argument(
        "--mix", default="valid=100", help="weights of valid, unknown, malformed and revoked keys"
    )
    parser.add_argument("--keys", type=int, default=100, help="valid keys to create for the run")
    parser.add_argument("--owner", default="keystile-bench", help="owner of the keys the run creates")
    parser.add_argument("--keep-keys", action="store_true", help="do not revoke the run's keys afterwards")
    parser.add_argument("--cpus", default="", help="pin load processes to these CPUs, such as 1 or 2,3")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="calls per second to offer, paced (default: as fast as possible)",
    )


def run_command(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``keystile bench``: create keys as the mix needs, run the load, report, clean up."""
    if args.concurrency < 1 or args.processes < 1 or args.duration <= 0 or args.keys < 1:
        raise ValueError("--concurrency, --processes, --keys and --duration must be positive")
    if args.rate < 0:
        raise ValueError("--rate must not be negative")
    mix = parse_mix(args.mix)
    cpus = tuple(int(c) for c in args.cpus.split(",") if c.strip())
    created: list[str] = []
    valid: list[str] = []
    revoked: list[str] = []
    try:
        if args.rpc != "health":
            for _ in range(args.keys if mix.get("valid") else 0):
                response = client.create_key(args.owner, "bench", scopes=["bench:verify"])
                created.append(response.key.id)
                valid.append(response.secret)
            for _ in range(min(args.keys, 10) if mix.get("revoked") else 0):
                response = client.create_key(args.owner, "bench-revoked")
                client.revoke_key(response.key.id, reason="keystile bench")
                revoked.append(response.secret)
            keys = mixed_keys(mix, valid, revoked)
            if args.rpc == "check":
                requests = check_requests(keys, scopes="bench:verify")
            else:
                requests = verify_requests(keys)
        else:
            requests = health_requests()
        spec = LoadSpec(
            target=args.target,
            requests=requests,
            rpc=args.rpc,
            concurrency=args.concurrency,
            duration=args.duration,
            processes=args.processes,
            warmup=args.warmup,
            cpus=cpus,
            rate=args.rate,
            metadata=(("authorization", f"Bearer {args.api_key}"),) if args.api_key else (),
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        show = sys.stderr.isatty() and not args.json
        result = run_load(spec, progress=_progress_line if show else None)
        if show:
            sys.stderr.write("\n")
    finally:
        if not args.keep_keys:
            for key_id in created:
                client.revoke_key(key_id, reason="keystile bench finished")
    report = {
        "target": args.target,
        "rpc": args.rpc,
        "mix": mix if args.rpc != "health" else {},
        "concurrency": args.concurrency,
        "processes": args.processes,
    } | result.summary()
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(format_report(report))
    return 0 if result.errors == 0 else 1


def _progress_line(elapsed: float, calls: int, errors: int) -> None:
    sys.stderr.write(f"\r  {elapsed:5.1f}s  {calls:>10,} calls  {errors:,} errors")
    sys.stderr.flush()


def format_report(report: dict[str, Any]) -> str:
    """The human-readable result."""
    latency = report["latency_ms"]
    lines = [
        f"target       {report['target']}  rpc {report['rpc']}  concurrency {report['concurrency']}"
        f"  processes {report['processes']}",
        f"calls        {report['calls']:,} in {report['seconds']:.1f}s = {report['calls_per_second']:,.0f}/s"
        f"  errors {report['errors']:,}",
        "latency ms   " + "  ".join(f"{name} {value:.2f}" for name, value in latency.items()),
    ]
    if report["results"]:
        lines.append("results      " + "  ".join(f"{k} {v:,}" for k, v in sorted(report["results"].items())))
    return "\n".join(lines) + "\n"
