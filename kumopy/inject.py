"""`kumopy inject`: push one message, or many generated ones, into a coordinator."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from email.utils import formatdate, make_msgid
from typing import Any

from kumopy.client import Client, Message
from kumopy.ipc.inject import DEFAULT_ENDPOINT

__all__ = ["add_inject_parser", "generate_messages", "make_body"]


def make_body(sender: str, rcpt: str, size: int, n: int) -> bytes:
    """Build a plausible RFC 5322 message of about `size` bytes with CRLF line endings."""
    domain = sender.rsplit("@", 1)[-1] or "kumopy.test"
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: kumopy test message {n}\r\n"
        f"Date: {formatdate(localtime=False)}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, message body line.\r\n"
    need = max(0, size - len(head))
    body = (line * (need // len(line) + 1))[:need]
    if body and not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n" if len(body) >= 2 else b""
    return head + body


def generate_messages(
    count: int,
    size: int,
    domain: str,
    sender: str,
    tenant: str | None,
    campaign: str | None,
    meta: dict[str, Any],
    tenants: list[str] | None = None,
) -> Iterator[Message]:
    """Yield `count` messages to distinct recipients at `domain`."""
    template = make_body(sender, f"user0@{domain}", size, 0)
    for i in range(count):
        t = tenants[i % len(tenants)] if tenants else tenant
        yield Message(
            sender, [f"user{i}@{domain}"], template, tenant=t, campaign=campaign, meta=dict(meta)
        )


def _batches(it: Iterator[Message], size: int) -> Iterator[list[Message]]:
    batch: list[Message] = []
    for m in it:
        batch.append(m)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _parse_meta(items: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"kumopy inject: --meta {item!r}: use KEY=VALUE")
        meta[key] = value
    return meta


def inject_many(
    client: Client,
    messages: Iterator[Message],
    count: int,
    batch: int,
    window: int,
    progress: bool = True,
) -> tuple[int, int, float, list[str]]:
    """Send messages in pipelined batches; return (accepted, rejected, seconds, reasons)."""
    from tqdm import tqdm

    accepted = rejected = 0
    reasons: list[str] = []
    start = time.perf_counter()
    with tqdm(
        total=count, unit="msg", disable=not progress, file=sys.stderr, desc="injecting"
    ) as bar:
        for results in client.send_batches(_batches(messages, batch), window=window):
            for r in results:
                if r.ok:
                    accepted += 1
                else:
                    rejected += 1
                    if len(reasons) < 5 and r.error is not None:
                        reasons.append(str(r.error))
            bar.update(len(results))
    return accepted, rejected, time.perf_counter() - start, reasons


def _cmd_inject(args: argparse.Namespace) -> int:
    meta = _parse_meta(args.meta)
    with Client(args.endpoint, timeout=args.timeout) as client:
        if args.generate:
            msgs = generate_messages(
                args.generate, args.size, args.domain, args.sender, args.tenant, args.campaign, meta
            )
            ok, bad, secs, reasons = inject_many(
                client, msgs, args.generate, args.batch, args.window, progress=not args.quiet
            )
            rate = ok / secs if secs > 0 else 0.0
            print(f"accepted {ok}, rejected {bad} in {secs:.2f}s ({rate:,.0f} msg/s)")
            for reason in reasons:
                print(f"  rejected: {reason}", file=sys.stderr)
            return 0 if bad == 0 else 1
        if not args.to:
            print("kumopy inject: give --to at least once (or --generate N)", file=sys.stderr)
            return 2
        if args.file in (None, "-"):
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as fh:
                data = fh.read()
        result = client.send(
            args.sender,
            args.to,
            data,
            id=args.id,
            tenant=args.tenant,
            campaign=args.campaign,
            meta=meta,
        )
    if result.ok:
        print(f"accepted {result.id}{' (duplicate)' if result.duplicate else ''}")
        return 0
    print(f"rejected: {result.error}", file=sys.stderr)
    return 1


def add_inject_parser(sub: Any) -> None:
    """Register the `inject` subcommand."""
    p = sub.add_parser("inject", help="inject a message (file or stdin) or --generate N")
    p.add_argument("file", nargs="?", help="RFC 5322 message file; stdin when absent or -")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--from", dest="sender", default="sender@kumopy.test")
    p.add_argument("--to", action="append", default=[], help="recipient (repeatable)")
    p.add_argument("--id", help="client id for de-duplication of a retried injection")
    p.add_argument("--tenant")
    p.add_argument("--campaign")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="inject N synthetic messages to distinct recipients at --domain",
    )
    p.add_argument("--size", type=int, default=2048, help="bytes per generated message")
    p.add_argument("--domain", default="example.test")
    p.add_argument("--batch", type=int, default=100, help="messages per request")
    p.add_argument("--window", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_inject)
