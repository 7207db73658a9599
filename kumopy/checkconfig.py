"""`kumopy check-config`: load a policy and sources files, probe its handlers, show or report."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from kumopy.checkprobe import (
    NO_DNS,
    SYNTHETIC_PROBES,
    Probe,
    ProbeResult,
    format_probes,
    parse_probe,
    run_probe,
)
from kumopy.errors import ConfigError
from kumopy.paths import EgressPath
from kumopy.policy import Policy, load_policy
from kumopy.textable import columns

__all__ = ["build_parser", "format_text", "main"]

_EXIT_OK = 0
_EXIT_INVALID = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the check-config subcommand."""
    parser = argparse.ArgumentParser(
        prog="kumopy check-config",
        description="Validate a policy and sources files, list the sources and pools, then "
        "call the policy's get_queue_config and get_egress_path_config handlers for some "
        "queues (probes) and show or report what they answer.",
        epilog="Exit status: 0 when the configuration is valid and every probe passes, 2 when not.",
    )
    parser.add_argument("policy", nargs="?", metavar="POLICY", help="Python policy file")
    parser.add_argument(
        "--sources",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="sources TOML file(s), merged after the policy's own; give POLICY first",
    )
    parser.add_argument(
        "--probe",
        action="append",
        type=_probe_arg,
        default=[],
        metavar="DOMAIN[,TENANT[,CAMPAIGN]]",
        help="ask get_queue_config about this queue, then get_egress_path_config about each "
        "source of its pool (repeatable); without --probe, a policy with handlers gets "
        + " ".join(SYNTHETIC_PROBES)
        + f". The site is the mx_list or the domain itself ({NO_DNS}); path settings are "
        "compared with kumopy's built-in defaults, as `kumopy run`'s flags are not known here",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser


def _probe_arg(text: str) -> Probe:
    """Parse a --probe value; argparse reports the error."""
    try:
        return parse_probe(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_text(policy: Policy) -> str:
    """Return the human-readable listing of a loaded policy's sources and pools."""
    described = policy.describe()
    hostname = socket.gethostname()
    lines = [f"Policy: {policy.path if policy.path is not None else '(none)'}", ""]
    lines.append(f"Sources ({len(described['sources'])}):")
    rows = [["NAME", "ADDRESS", "FAMILY", "EHLO", "PORT", "POOLS"]]
    idle = []
    for source in described["sources"]:
        rows.append(
            [
                source["name"],
                source["source_address"] or "(default)",
                source["family"] or "any",
                source["ehlo_domain"] or f"(hostname: {hostname})",
                str(source["remote_port"] or 25),
                ", ".join(source["pools"]) or "-",
            ]
        )
        if not source["pools"] and source["name"] != "unspecified":
            idle.append(source["name"])
    lines.extend(columns(rows, indent="  "))
    if idle:
        lines.append(f"  note: in no pool (no worker will run for them): {', '.join(idle)}")
    lines.extend(["", f"Pools ({len(described['pools'])}):"])
    for pool in described["pools"]:
        if not pool["entries"]:
            lines.append(f"  {pool['name']}: empty; messages routed to it wait")
            continue
        lines.append(f"  {pool['name']}:")
        rows = [["SOURCE", "WEIGHT", "SHARE"]]
        rows.extend([e["name"], str(e["weight"]), f"{e['share']:.1f}%"] for e in pool["entries"])
        lines.extend(columns(rows, indent="    "))
    return "\n".join(lines) + "\n"


def _issues_json(exc: ConfigError) -> dict[str, Any]:
    """Return the --json form of a ConfigError."""
    return {
        "errors": [
            {"where": i.where, "object": i.obj, "field": i.field, "problem": i.problem}
            for i in exc.issues
        ]
    }


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run `kumopy check-config POLICY [--sources F] [--probe P] [--json]`; return the status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.policy is None and not args.sources:
            parser.error("give a POLICY file, --sources FILE, or both")
    except SystemExit as exc:
        # argparse exits for --help and usage errors; the CLI wants a status instead.
        return exc.code if isinstance(exc.code, int) else _EXIT_INVALID
    try:
        # The policy's own prints go to stderr: stdout carries only check-config's output.
        with contextlib.redirect_stdout(err):
            policy = load_policy(args.policy, args.sources)
    except ConfigError as exc:
        if args.json:
            json.dump(_issues_json(exc), out, indent=2)
            out.write("\n")
        else:
            count = len(exc.issues)
            err.write(f"kumopy check-config: {count} error{'s' if count != 1 else ''}:\n")
            err.writelines(f"  {issue}\n" for issue in exc.issues)
        return _EXIT_INVALID
    results = _probe(policy, args.probe, err)
    found = [(result.probe, e) for result in results for e in result.errors]
    errors = [(probe, e) for probe, e in found if not e.warning]
    warnings = [(probe, e) for probe, e in found if e.warning]
    if args.json:
        data = policy.describe()
        data["probes"] = [result.to_dict() for result in results]
        data["errors"] = [e.to_dict(probe) for probe, e in errors]
        data["warnings"] = [e.to_dict(probe) for probe, e in warnings]
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        out.write(format_text(policy) + format_probes(policy, results))
        if errors:
            count = len(errors)
            err.write(f"kumopy check-config: {count} error{'s' if count != 1 else ''}:\n")
            err.writelines(f"  probe {probe.label}: {e.message}\n" for probe, e in errors)
        if warnings:
            count = len(warnings)
            err.write(
                f"kumopy check-config: {count} warning{'s' if count != 1 else ''} "
                "(a handler raised for a synthetic probe; name real queues with --probe):\n"
            )
            err.writelines(f"  probe {probe.label}: {e.message}\n" for probe, e in warnings)
    return _EXIT_INVALID if errors else _EXIT_OK


def _probe(policy: Policy, probes: list[Probe], err: TextIO) -> list[ProbeResult]:
    """Run the given probes, or the synthetic ones when the policy has handlers to probe."""
    if not probes:
        handlers = ("get_queue_config", "get_egress_path_config")
        if not any(policy.has_handler(event) for event in handlers):
            return []
        probes = [parse_probe(text, synthetic=True) for text in SYNTHETIC_PROBES]
    # Path settings are compared with the built-in defaults: `kumopy run`'s flags are unknown.
    defaults = EgressPath()
    with contextlib.redirect_stdout(err):
        return [run_probe(policy, probe, defaults) for probe in probes]
