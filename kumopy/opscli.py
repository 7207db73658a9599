"""Operator verbs over the control channel: queues, suspend, resume, bounce, rebind, reload."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

import zmq

from kumopy.errors import KumoError, ProtocolError, error_from_dict
from kumopy.ipc.control import SELECTORS, default_control_endpoint
from kumopy.ipc.framing import decode_header, encode_header

__all__ = ["ControlClient", "add_ops_parsers", "format_queues"]

_SPOOL = os.path.join("var", "spool")


class ControlClient:
    """One REQ-like exchange at a time with the coordinator's control socket."""

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.timeout_ms = int(timeout * 1000)
        self._req = itertools.count(1)

    def request(self, kind: str, **fields: Any) -> Any:
        """Send one request and return its result; raise the coordinator's error."""
        req = next(self._req)
        self.sock.send(encode_header(kind, req=req, **fields))
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self.sock.poll(left):
                raise KumoError(f"no answer from {self.endpoint} (is kumopy running?)")
            reply = decode_header(self.sock.recv())
            if reply.get("req") != req:
                continue  # an answer to an earlier request that timed out
            if not reply.get("ok"):
                raise error_from_dict(reply.get("error") or {})
            return reply.get("result")

    def close(self) -> None:
        """Close the socket and its context."""
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _endpoint(args: argparse.Namespace) -> str:
    return str(args.control or default_control_endpoint(args.spool))


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    names = ("queue", "tenant", "campaign", "domain") if args.verb == "rebind" else SELECTORS
    fields = {key: getattr(args, key) for key in names if getattr(args, key, None)}
    if len(fields) != 1:
        raise ProtocolError("name exactly one of " + ", ".join(f"--{s}" for s in SELECTORS))
    if getattr(args, "duration", None):
        fields["duration"] = args.duration
    if getattr(args, "reason", None):
        fields["reason"] = args.reason
    return fields


def _when(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    return f"in {stamp - now:.0f}s" if stamp > now else "now"


def format_queues(data: dict[str, Any], now: float) -> str:
    """Return the `kumopy queues` table: scheduled queues, then source -> site paths."""
    lines = [
        f"{'scheduled queue':40} {'pool':12} {'ready':>7} {'delayed':>8} {'flight':>7} "
        f"{'deliv':>7} {'defer':>7} {'bounce':>7}  next",
    ]
    for q in data["queues"]:
        lines.append(
            f"{q['queue'][:40]:40} {str(q['pool'])[:12]:12} {q['ready']:>7} {q['delayed']:>8} "
            f"{q['in_flight']:>7} {q['delivered']:>7} {q['deferred']:>7} {q['bounced']:>7}  "
            f"{_when(q['next_due'], now)}" + (f"  ERROR {q['error']}" if q["error"] else "")
        )
    if data["queue_count"] > len(data["queues"]):
        lines.append(f"... {data['queue_count'] - len(data['queues'])} more queues")
    lines.append("")
    lines.append(
        f"{'source -> site':52} {'ready':>6} {'flight':>7} {'conns':>6} {'deliv':>7} "
        f"{'defer':>7} {'bounce':>7}"
    )
    for p in data["paths"]:
        name = f"{p['source']} -> {p['site']}"
        lines.append(
            f"{name[:52]:52} {p['ready']:>6} {p['in_flight']:>7} {p['connections']:>6} "
            f"{p['delivered']:>7} {p['deferred']:>7} {p['bounced']:>7}"
            + (f"  HELD {p['held']}" if p["held"] else "")
        )
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    try:
        with ControlClient(_endpoint(args), timeout=args.timeout) as client:
            return int(args.run(client, args))
    except KumoError as exc:
        print(f"kumopy {args.verb}: {exc}", file=sys.stderr)
        return 1


def _queues(client: ControlClient, args: argparse.Namespace) -> int:
    while True:
        data = client.request("queues", limit=args.limit)
        if args.json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print(format_queues(data, time.time()), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _suspend(client: ControlClient, args: argparse.Namespace) -> int:
    result = client.request("suspend", **_selection(args))
    print(f"suspended: {result['text']}")
    return 0


def _resume(client: ControlClient, args: argparse.Namespace) -> int:
    result = client.request("resume", **_selection(args))
    for line in result["resumed"]:
        print(f"resumed: {line}")
    if not result["count"]:
        print("nothing was suspended there")
    return 0


def _bounce(client: ControlClient, args: argparse.Namespace) -> int:
    fields = _selection(args)
    if not args.yes:
        count = client.request("bounce", dry_run=True, **fields)
        answer = input(
            f"bounce {count['messages']} messages ({count['in_flight']} being delivered now, "
            "bounced if that attempt fails)? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing bounced")
            return 1
    result = client.request("bounce", **fields)
    print(f"bounced {result['bounced']}; {result['after_attempt']} more when their attempt ends")
    return 0


def _rebind(client: ControlClient, args: argparse.Namespace) -> int:
    result = client.request("rebind", to_pool=args.new_pool, **_selection(args))
    print(
        f"rebound {result['rebound']} messages to pool {args.new_pool} "
        f"({result['in_flight']} being delivered now stay)"
    )
    return 0


def _reload(client: ControlClient, args: argparse.Namespace) -> int:
    result = client.request("reload")
    if result["ok"]:
        print("policy reloaded")
        return 0
    print("reload refused; the running policy stays:", file=sys.stderr)
    for line in result["errors"]:
        print(f"  {line}", file=sys.stderr)
    return 2


def _ping(client: ControlClient, args: argparse.Namespace) -> int:
    client.request("ping")
    print("pong")
    return 0


def _selectors(p: argparse.ArgumentParser, what: str, names: tuple[str, ...]) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    for name in names:
        group.add_argument(f"--{name}", metavar="NAME", help=f"{what} this {name}")


def add_ops_parsers(sub: Any) -> None:
    """Add the operator verbs to `kumopy`'s subcommands."""
    verbs = [
        ("queues", "summary per scheduled queue and per source -> site", _queues),
        (
            "suspend",
            "take a source, pool, queue, tenant, campaign or domain out of sending",
            _suspend,
        ),
        ("resume", "undo a suspension", _resume),
        ("bounce", "remove matching messages, with an AdminBounce record each", _bounce),
        ("rebind", "move queued messages to another pool", _rebind),
        ("reload", "load the policy again (like SIGHUP) and print its errors", _reload),
        ("ping", "check that the coordinator answers on its control channel", _ping),
    ]
    for verb, help_text, run in verbs:
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("--control", help="control endpoint (default: ipc://SPOOL/control.sock)")
        p.add_argument("--spool", default=_SPOOL, help="spool directory of the coordinator")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
        if verb in ("suspend", "resume", "bounce"):
            _selectors(p, verb, SELECTORS)
        if verb == "rebind":
            _selectors(p, "move the queued messages of", ("queue", "tenant", "campaign", "domain"))
        if verb in ("suspend", "bounce", "rebind"):
            p.add_argument("--reason", required=verb == "bounce", help="why (logged)")
        if verb == "suspend":
            p.add_argument("--duration", help='how long, e.g. "2h" (default: until resumed)')
        if verb == "bounce":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if verb == "rebind":
            p.add_argument("--pool", dest="new_pool", required=True, help="the new pool")
        if verb == "queues":
            p.add_argument("--json", action="store_true", help="print JSON")
            p.add_argument("--watch", type=float, nargs="?", const=2.0, help="refresh every N s")
            p.add_argument("--limit", type=int, default=200, help="scheduled queues listed")
        p.set_defaults(func=_cmd, run=run, verb=verb)
