"""Delivery throughput of one egress source: a Deliverer on uvloop sending into a sink process.

Run: .venv/bin/python -m bench.bench_deliver [--count 20000] [--connections 32] [--size 2048]

The sink is `python -m kumopy sink` (kumopy.harness.start_sink, stopped by its PID), so the
sender and the receiver each get a process of their own. Every message goes to its own
recipient; the clock runs from the first submit() to the last result, connection set-up
included. The sink's record file is read back to check that every delivered message arrived.

Under pytest this module also holds a hot-path benchmark of encode_data (run once as a test,
timed with --benchmark-enable) and a small end-to-end run that keeps the script working.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

from kumopy.config import EgressSource
from kumopy.harness import SinkRecords, start_sink
from kumopy.inject import make_body
from kumopy.ipc.jobs import DELIVERED, Job, JobResult, SiteSpec
from kumopy.smtp.wire import decode_data
from kumopy.worker.delivery import Deliverer

if TYPE_CHECKING:
    # Only the pytest functions need these; the script runs without the test extras.
    from pytest_benchmark.fixture import BenchmarkFixture

    from tests.conftest_fast import FastImpl

__all__ = ["main", "run"]

SITE = "bench.kumopy.test"
SENDER = "bench@sender.kumopy.test"


async def _deliver_all(
    source: EgressSource, spec: SiteSpec, jobs: list[Job], timeout: float
) -> tuple[float, dict[str, Any], Counter[str]]:
    """Submit every job to one Deliverer; return the seconds to the last result, stats, outcomes."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcomes: Counter[str] = Counter()
    left = len(jobs)

    def on_result(result: JobResult) -> None:
        nonlocal left
        for r in result.results:
            outcomes[r.status] += 1
        left -= 1
        if left == 0 and not done.done():
            done.set_result(None)

    deliverer = Deliverer(source, on_result)
    deliverer.define_site(spec)
    t0 = time.perf_counter()
    for job in jobs:
        deliverer.submit(job)
    await asyncio.wait_for(done, timeout)
    secs = time.perf_counter() - t0
    stats = deliverer.stats()
    await deliverer.drain(5.0)
    return secs, stats, outcomes


def run(
    count: int,
    connections: int,
    size: int = 2048,
    *,
    workdir: Path | None = None,
    source_address: str = "127.0.0.2",
) -> dict[str, Any]:
    """Deliver `count` messages of about `size` bytes into a fresh sink; return the figures."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="kumopy-bench-deliver-") as tmp:
            return run(count, connections, size, workdir=Path(tmp), source_address=source_address)
    sink = start_sink(workdir / "sink")
    try:
        host, port = str(sink.info["host"]), int(sink.info["port"])
        spec = SiteSpec(SITE, [(host, host, port, 0)], {"connection_limit": connections})
        # One body shared by every job, as a worker holds one frame per message.
        body = make_body(SENDER, f"user0@{SITE}", size, 0)
        jobs = [Job(i, f"bench-{i}", SENDER, [f"user{i}@{SITE}"], body, SITE) for i in range(count)]
        source = EgressSource("bench", source_address=source_address, ehlo_domain=SITE)
        # The sender's own CPU (the sink is another process): the engine's cost per message.
        cpu0 = time.process_time()
        secs, stats, outcomes = uvloop.run(
            _deliver_all(source, spec, jobs, timeout=60 + count / 100)
        )
        cpu = time.process_time() - cpu0
        delivered = outcomes[DELIVERED]
        arrived = SinkRecords(sink.info["record"]).wait_count(delivered, timeout=30)
    finally:
        sink.stop()
    return {
        "messages": count,
        "size": len(body),
        "connection_limit": connections,
        # Cumulative: a connection is replaced after max_deliveries_per_connection messages.
        "connections_opened": stats["sites"][SITE]["opened"],
        "outcomes": dict(outcomes),
        "at_sink": len(arrived),
        "peer_ips": sorted({r["peer_ip"] for r in arrived}),
        "seconds": secs,
        "rate": count / secs,
        "cpu_us_per_msg": cpu * 1e6 / count,
    }


def main(argv: list[str] | None = None) -> int:
    """Run one delivery benchmark and print messages per second."""
    p = argparse.ArgumentParser(prog="python -m bench.bench_deliver", description=__doc__)
    p.add_argument("--count", type=int, default=20000, help="messages to deliver")
    p.add_argument("--connections", type=int, default=32, help="connection_limit of the source")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes")
    p.add_argument("--source", default="127.0.0.2", help="source address to bind")
    args = p.parse_args(argv)
    r = run(args.count, args.connections, args.size, source_address=args.source)
    print(
        f"{r['messages']} messages of {r['size']} bytes from {args.source}, "
        f"connection_limit {r['connection_limit']} ({r['connections_opened']} opened in all): "
        f"{r['rate']:,.0f} msgs/s in {r['seconds']:.2f} s, sender CPU "
        f"{r['cpu_us_per_msg']:.1f} µs/msg; outcomes {r['outcomes']}, "
        f"{r['at_sink']} recorded by the sink"
    )
    return 0 if r["outcomes"].get(DELIVERED, 0) == r["messages"] == r["at_sink"] else 1


def _dotted_body(size: int) -> bytes:
    """Return about `size` bytes of lines, every third one starting with a dot, mixed endings."""
    lines = []
    total = 0
    n = 0
    while total < size:
        text = b"%s line %d of a body that needs stuffing" % (b"." if n % 3 == 0 else b"", n)
        eol = (b"\n", b"\r\n", b"\n", b"\r")[n % 4]
        lines.append(text + eol)
        total += len(text) + len(eol)
        n += 1
    # No final line ending: encode_data must add the CRLF before the terminator.
    return b"".join(lines).rstrip(b"\r\n")


def test_encode_data_100k(benchmark: BenchmarkFixture, fast_impl: FastImpl) -> None:
    """Time dot-stuffing and line-ending repair of a 100 KB body, for each twin."""
    body = _dotted_body(100_000)
    assert body.startswith(b".") and b"\n." in body and b"\r." in body
    out = benchmark(fast_impl.encode_data, body)
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", body) + b"\r\n"
    assert decode_data(out) == expected
    assert out.startswith(b"..") and out.endswith(b"\r\n.\r\n")
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")


@pytest.mark.integration
def test_run_delivers_every_message(tmp_path: Path) -> None:
    """Run the benchmark small: every message delivered from the source address, on few links."""
    r = run(30, 2, 600, workdir=tmp_path, source_address="127.0.0.3")
    assert r["outcomes"] == {DELIVERED: 30} and r["at_sink"] == 30
    assert r["peer_ips"] == ["127.0.0.3"] and 1 <= r["connections_opened"] <= 2
    assert r["rate"] > 0


if __name__ == "__main__":
    sys.exit(main())
