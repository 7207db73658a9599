"""`kumopy demo`: a coordinator, its workers and a local sink on loopback, end to end."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from kumopy.client import Client
from kumopy.harness import Proc, SinkRecords, start_coordinator, start_sink
from kumopy.inject import generate_messages, inject_many
from kumopy.textable import table

__all__ = ["add_demo_parser", "run_demo"]


def _policy_path() -> str:
    return str(resources.files("kumopy") / "examples" / "demo_policy.py")


def _rate(count: int, first: float, last: float) -> str:
    """Return a source's deliveries per second between its first and last one at the sink."""
    if count < 2 or last <= first:
        return "-"
    return f"{(count - 1) / (last - first):,.0f}/s"


def run_demo(count: int, size: int, workdir: Path, no_fsync: bool, progress: bool = True) -> int:
    """Run the whole demo and print per-source and per-pool tables; return the exit code."""
    from tqdm import tqdm

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    procs: list[Proc] = []
    try:
        sink = start_sink(workdir / "sink")
        procs.append(sink)
        sink_addr = f"127.0.0.1:{sink.info['port']}"
        extra = ["--log-level", "WARNING"] + (["--no-fsync"] if no_fsync else [])
        coord = start_coordinator(
            workdir, _policy_path(), extra=extra, env={"KUMOPY_DEMO_SINK": sink_addr}
        )
        procs.append(coord)
        print(
            f"coordinator on {coord.info['endpoint']}, sink on {sink_addr}, work files in {workdir}"
        )
        records = SinkRecords(sink.info["record"])
        with Client(coord.info["endpoint"]) as client:
            msgs = generate_messages(
                count,
                size,
                "demo.kumopy.test",
                "news@demo.kumopy.test",
                None,
                None,
                {},
                tenants=["acme", "bigco"],
            )
            t0 = time.perf_counter()
            ok, bad, secs, reasons = inject_many(client, msgs, count, 100, 4, progress)
            print(
                f"injected {ok} messages ({bad} rejected) in {secs:.2f}s "
                f"({ok / max(secs, 1e-9):,.0f} msg/s accepted, durable)"
            )
            for r in reasons:
                print(f"  rejected: {r}")
            with tqdm(
                total=ok, unit="msg", disable=not progress, file=sys.stderr, desc="delivered"
            ) as bar:
                deadline = time.monotonic() + max(60.0, ok / 50)
                while len(records.refresh()) < ok and time.monotonic() < deadline:
                    bar.update(len(records.records) - bar.n)
                    time.sleep(0.05)
                bar.update(len(records.records) - bar.n)
            elapsed = time.perf_counter() - t0
            status = client.request("status")
        _report(records.records, status, elapsed, ok)
        return 0 if len(records.records) >= ok and bad == 0 else 1
    finally:
        for p in reversed(procs):
            p.stop()


def _report(recs: list[dict[str, Any]], status: dict[str, Any], elapsed: float, total: int) -> None:
    sources = status["sources"]
    by_ip = {v["source_address"]: k for k, v in sources.items() if v["source_address"]}
    seen: dict[str, Counter[tuple[str, str]]] = {}
    counts: Counter[str] = Counter()
    span: dict[str, tuple[float, float]] = {}
    for r in recs:
        name = by_ip.get(r["peer_ip"], "unspecified")
        counts[name] += 1
        seen.setdefault(name, Counter())[(r["peer_ip"], r.get("helo") or "")] += 1
        first, last = span.get(name, (r["time"], r["time"]))
        span[name] = (min(first, r["time"]), max(last, r["time"]))
    n = max(1, len(recs))
    rows = []
    for name in sources:
        if not counts[name]:
            continue
        ip, ehlo = seen[name].most_common(1)[0][0]
        rows.append(
            [
                name,
                str(counts[name]),
                f"{100 * counts[name] / n:.1f}%",
                _rate(counts[name], *span[name]),
                ip,
                ehlo,
            ]
        )
    print()
    print(
        f"delivered {len(recs)} of {total} in {elapsed:.2f}s "
        f"({len(recs) / elapsed:,.0f} msg/s end to end)"
    )
    print()
    print("Per source (as the sink saw it):")
    # A source's rate over its own first-to-last delivery, not over the whole run: the latter
    # is each source's share of the total by construction and says nothing of its speed.
    print(table(rows, ["source", "messages", "share", "its rate", "peer IP", "EHLO name"]))
    print()
    print("Per pool (the coordinator's picks):")
    rows = []
    for pool, picks in status["pools"].items():
        ptotal = sum(picks.values())
        for src, c in sorted(picks.items()):
            rows.append([pool, src, str(c), f"{100 * c / max(1, ptotal):.1f}%"])
    print(table(rows, ["pool", "source", "picks", "share"]))


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(
        args.count, args.size, Path(args.workdir), args.no_fsync, progress=not args.quiet
    )


def add_demo_parser(sub: Any) -> None:
    """Register the `demo` subcommand."""
    p = sub.add_parser("demo", help="run a coordinator, workers and a sink on loopback")
    p.add_argument("--count", type=int, default=3000, help="messages to send")
    p.add_argument("--size", type=int, default=2048, help="bytes per message")
    p.add_argument("--workdir", default="var/demo", help="spool, logs and sink records go here")
    p.add_argument("--no-fsync", action="store_true", help="spool without fsync (faster, unsafe)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
