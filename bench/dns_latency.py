"""Slow DNS must not slow other domains: 1,000 domains answering in 200 ms beside a fast one.

    python -m bench.dns_latency [--slow 1000] [--delay 0.2] [--count 2000]

Runs against one sink and one FakeDNS on loopback, each with a fresh coordinator: the fast
domain's messages alone, then the same with one message to each slow domain injected just
before them; both with the fast domain already in use (its MX cached) and not. It prints how
long the fast domain's messages took to arrive, and the ratio (1.0: the slow lookups cost the
fast domain nothing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from kumopy.client import Client, Message
from kumopy.fakedns import FakeDNS
from kumopy.harness import Proc, SinkRecords, start_coordinator, start_sink, wait_for
from kumopy.inject import make_body

POLICY = """
from kumopy import kumo

kumo.dns.configure_resolver(name_servers=[{dns!r}], timeout="5s")

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.bench.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.bench.test")
    kumo.define_egress_pool(name="fast", entries=[{{"name": "a"}}])
    kumo.define_egress_pool(name="slow", entries=[{{"name": "b"}}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="slow" if tenant == "slow" else "fast")

@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    return kumo.make_egress_path(smtp_port={port}, prohibited_hosts=[])
"""


def _zone(dns: FakeDNS, slow: int, delay: float) -> None:
    dns.add("mx.bench.test", "A", "127.0.0.1")
    dns.add("fast.bench.test", "MX", "10 mx.bench.test.")
    # The slow domains' mail goes from a source and to a site of their own: what is measured
    # is what their DNS answers cost the fast domain, not delivery capacity they would share.
    dns.add("mx.slow.bench.test", "A", "127.0.0.9")
    for i in range(slow):
        name = f"slow{i}.bench.test"
        dns.add(name, "MX", "10 mx.slow.bench.test.")
        dns.set_delay(name, delay)


def _run(
    work: Path, dns: FakeDNS, sinks: tuple[Proc, Proc], slow: int, count: int, warm: bool
) -> dict[str, Any]:
    sink, other = sinks
    work.mkdir(parents=True, exist_ok=True)
    (work / "policy.py").write_text(POLICY.format(dns=dns.address, port=sink.info["port"]))
    coord = start_coordinator(
        work, str(work / "policy.py"), extra=["--no-fsync", "--log-level", "WARNING"]
    )
    records = SinkRecords(sink.info["record"])
    before = len(records.refresh())
    slow_records = SinkRecords(other.info["record"])
    slow_before = len(slow_records.refresh())
    body = make_body("s@bench.test", "r@fast.bench.test", 1024, 0)
    try:
        with Client(coord.info["endpoint"], timeout=120) as client:
            if warm:
                # The fast domain is in use already: its MX answer is cached.
                (ok,) = client.send_batch([Message("s@bench.test", ["w@fast.bench.test"], body)])
                assert ok.ok
                wait_for(lambda: len(records.refresh()) > before, 60, "the warm-up message")
                before += 1
            if slow:
                slow_msgs = [
                    Message("s@bench.test", [f"r@slow{i}.bench.test"], body, tenant="slow")
                    for i in range(slow)
                ]
                for chunk in client.send_batches(
                    [slow_msgs[i : i + 500] for i in range(0, slow, 500)]
                ):
                    assert all(r.ok for r in chunk)
            fast = [Message("s@bench.test", [f"r{i}@fast.bench.test"], body) for i in range(count)]
            t0 = time.perf_counter()
            for chunk in client.send_batches([fast[i : i + 500] for i in range(0, count, 500)]):
                assert all(r.ok for r in chunk)

            def arrived() -> int:
                recs = records.refresh()[before:]
                return sum(1 for r in recs if r["rcpt_to"][0].endswith("@fast.bench.test"))

            wait_for(lambda: arrived() >= count, 300, "the fast domain's messages", 0.01)
            fast_secs = time.perf_counter() - t0
            wait_for(
                lambda: len(slow_records.refresh()) - slow_before >= slow,
                300,
                "the slow domains' messages",
                0.05,
            )
            total_secs = time.perf_counter() - t0
    finally:
        coord.stop()
    return {
        "slow_domains": slow,
        "warm": warm,
        "fast_seconds": fast_secs,
        "all_seconds": total_secs,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the two rounds and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slow", type=int, default=1000)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--count", type=int, default=2000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kumopy-dns-bench-") as tmp, FakeDNS() as dns:
        _zone(dns, args.slow, args.delay)
        sink = start_sink(Path(tmp) / "sink")
        # Same port on another address, for the slow domains' site.
        other = start_sink(
            Path(tmp) / "sink2",
            host="127.0.0.9",
            extra=["--listen", f"127.0.0.9:{sink.info['port']}"],
        )
        try:
            runs = {
                (warm, slow): _run(
                    Path(tmp) / f"{warm}-{slow}", dns, (sink, other), slow, args.count, warm
                )
                for warm in (True, False)
                for slow in (0, args.slow)
            }
        finally:
            sink.stop()
            other.stop()
    ratios = {}
    for warm in (True, False):
        alone, beside = runs[(warm, 0)], runs[(warm, args.slow)]
        ratio = ratios["warm" if warm else "cold"] = beside["fast_seconds"] / alone["fast_seconds"]
        state = "already resolved" if warm else "not yet resolved"
        print(
            f"{args.count} messages to a fast domain ({state}): {alone['fast_seconds']:.2f} s "
            f"alone, {beside['fast_seconds']:.2f} s beside {args.slow} domains whose DNS "
            f"answers take {args.delay * 1000:.0f} ms (ratio {ratio:.2f}); every slow-domain "
            f"message arrived {beside['all_seconds']:.2f} s after the fast ones were injected"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"dns-latency-{stamp}.json").write_text(
        json.dumps(
            {"runs": [dict(r) for r in runs.values()], "ratios": ratios, **vars(args)}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
