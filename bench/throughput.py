"""End-to-end throughput: kumopy (durable and --no-fsync) against a raw sender, one sink, one run.

Run: .venv/bin/python -m bench.throughput [--count 20000] [--size 2048]
Prints a table and writes bench/results/throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kumopy.client import Client
from kumopy.harness import SinkRecords, start_coordinator, start_sink, wait_for
from kumopy.inject import generate_messages, inject_many

POLICY = """
import os
from kumopy import kumo
SINK = os.environ["KUMOPY_DEMO_SINK"]

@kumo.on("init")
def init():
    for n in (1, 2, 3):
        kumo.define_egress_source(name=f"src{n}", source_address=f"127.0.0.{n + 1}",
                                  ehlo_domain=f"src{n}.bench.kumopy.test")
    kumo.define_egress_pool(name="all", entries=[{"name": f"src{n}"} for n in (1, 2, 3)])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="all", mx_list=[SINK])
"""


def run_kumopy(work: Path, count: int, size: int, fsync: bool) -> dict[str, Any]:
    """Inject `count` messages into a fresh coordinator and time them to the sink."""
    sink = start_sink(work / "sink")
    policy = work / "policy.py"
    policy.write_text(POLICY)
    extra = ["--log-level", "WARNING"] + ([] if fsync else ["--no-fsync"])
    coord = start_coordinator(
        work, str(policy), extra=extra, env={"KUMOPY_DEMO_SINK": f"127.0.0.1:{sink.info['port']}"}
    )
    records = SinkRecords(sink.info["record"])
    try:
        with Client(coord.info["endpoint"], timeout=120) as client:
            msgs = generate_messages(
                count, size, "bench.kumopy.test", "s@bench.kumopy.test", None, None, {}
            )
            t0 = time.perf_counter()
            ok, bad, inj_secs, _ = inject_many(client, msgs, count, 200, 8, progress=False)
            wait_for(
                lambda: len(records.refresh()) >= ok,
                max(120, count / 20),
                f"{ok} messages at the sink",
                interval=0.05,
            )
            secs = time.perf_counter() - t0
        per_ip = Counter(r["peer_ip"] for r in records.records)
        return {
            "mode": "kumopy" + ("" if fsync else " --no-fsync"),
            "messages": ok,
            "rejected": bad,
            "seconds": secs,
            "rate": ok / secs,
            "inject_rate": ok / inj_secs,
            "per_source": {ip: n / secs for ip, n in sorted(per_ip.items())},
        }
    finally:
        coord.stop()
        sink.stop()


def run_raw(work: Path, count: int, size: int) -> dict[str, Any] | None:
    """Blast the same sink with postfix's smtp-source (a C sender), when installed."""
    tool = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None
    )
    if tool is None:
        return None
    sink = start_sink(work / "rawsink")
    records = SinkRecords(sink.info["record"])
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [
                tool,
                "-s",
                "32",
                "-m",
                str(count),
                "-l",
                str(size),
                "-d",
                "-f",
                "s@bench.kumopy.test",
                "-t",
                "r@bench.kumopy.test",
                f"127.0.0.1:{sink.info['port']}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: len(records.refresh()) >= count, 120, "raw messages at the sink")
        secs = time.perf_counter() - t0
        return {
            "mode": "smtp-source (raw C sender)",
            "messages": count,
            "seconds": secs,
            "rate": count / secs,
        }
    finally:
        sink.stop()


def main(argv: list[str] | None = None) -> int:
    """Run every mode once, print a table and save the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--size", type=int, default=2048)
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kumopy-bench-") as tmp:
        raw = run_raw(Path(tmp) / "raw", args.count, args.size)
        if raw:
            results.append(raw)
        results.append(run_kumopy(Path(tmp) / "durable", args.count, args.size, fsync=True))
        results.append(run_kumopy(Path(tmp) / "nofsync", args.count, args.size, fsync=False))
    base = results[0]["rate"]
    print(f"{args.count} messages of {args.size} bytes, 3 sources, one sink, same run")
    print(f"{'mode':32} {'msg/s':>9} {'ratio':>7}  per source (msg/s)")
    for r in results:
        per = " ".join(f"{ip}={v:,.0f}" for ip, v in r.get("per_source", {}).items())
        print(f"{r['mode']:32} {r['rate']:>9,.0f} {r['rate'] / base:>7.2f}  {per}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"throughput-{stamp}.json").write_text(
        json.dumps({"count": args.count, "size": args.size, "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
