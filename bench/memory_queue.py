"""Coordinator memory with many messages queued: RSS and PSS per queued message.

    python -m bench.memory_queue --count 200000 --size 2048 [--stalled]

Without --stalled, the destination refuses connections: every message is deferred and its
body dropped from memory (metadata only). With --stalled, the destination accepts and never
greets: messages wait ready, their bodies cached up to the cache budget (256 MiB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bench.procmem import memory
from kumopy.client import Client, Message
from kumopy.harness import start_coordinator, start_sink, wait_for
from kumopy.inject import make_body

POLICY = """
from kumopy import kumo
import os

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.bench.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[os.environ["BENCH_DEST"]],
                                  retry_interval="1h")
"""


def main() -> None:
    """Run the measurement and print a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--stalled", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kumopy-mem-"))
    procs = []
    try:
        if args.stalled:
            sink = start_sink(work / "sink", extra=["--greeting-delay", "3600"])
            procs.append(sink)
            dest = f"127.0.0.1:{sink.info['port']}"
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dest = f"127.0.0.1:{s.getsockname()[1]}"
        (work / "policy.py").write_text(POLICY)
        coord = start_coordinator(
            work / "coord",
            str(work / "policy.py"),
            extra=["--no-fsync", "--log-level", "WARNING", "--heartbeat-timeout", "3600"],
            env={"BENCH_DEST": dest},
        )
        procs.append(coord)
        with Client(coord.info["endpoint"], timeout=120) as c:
            base = memory(coord.pid)
            body = make_body("s@src.test", "x", args.size, 0)
            msgs = (
                Message("s@src.test", [f"r{i}@d{i % 1000}.test"], body) for i in range(args.count)
            )
            batches = iter(lambda: [m for _, m in zip(range(500), msgs, strict=False)], [])
            t0 = time.monotonic()
            for chunk in c.send_batches(batches, window=4):
                assert all(r.ok for r in chunk)
            injected = time.monotonic() - t0

            def settled() -> bool:
                st = c.request("status")
                busy = st["ready"] + st["backlog"] if not args.stalled else 0
                return bool(st["messages"] == args.count and busy == 0)

            wait_for(settled, 600, "the queue to settle")
            time.sleep(1.0)
            mem = memory(coord.pid)
            st = c.request("status")
        grown = mem["rss"] - base["rss"]
        print(
            json.dumps(
                {
                    "count": args.count,
                    "size": args.size,
                    "stalled": args.stalled,
                    "inject_seconds": round(injected, 1),
                    "rss_before_mib": round(base["rss"] / 2**20, 1),
                    "rss_after_mib": round(mem["rss"] / 2**20, 1),
                    "pss_after_mib": round(mem["pss"] / 2**20, 1),
                    "bytes_per_message": round(grown / args.count),
                    "ready": st["ready"],
                    "delayed": st["delayed"],
                    "backlog": st["backlog"],
                },
                indent=2,
            )
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
