"""End-to-end throughput: kumopy (durable and --no-fsync) against a raw sender, one sink, one run.

Run: .venv/bin/python -m bench.throughput [--count 20000] [--size 2048] [--sink auto|kumopy]
Prints a table and writes bench/results/throughput-<time>.json. The measuring code is
`kumopy bench`'s (kumopy/benchrun.py, kumopy/benchsink.py): a synthetic policy of three sources
in one pool, Postfix's smtp-sink when installed (else kumopy's sink), smtp-source as the raw
sender into the same sink.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kumopy.benchinject import InjectPlan
from kumopy.benchpolicy import BENCH_DOMAIN, synthetic_policy
from kumopy.benchrun import Measure, run_measurement
from kumopy.benchsink import run_ceiling, start_bench_sink
from kumopy.harness import Proc


def run_kumopy(work: Path, sink: Proc, count: int, size: int, fsync: bool) -> dict[str, Any]:
    """Inject `count` messages into a fresh coordinator of 3 sources and time them to the sink."""
    policy = work / "policy.py"
    work.mkdir(parents=True)
    policy.write_text(synthetic_policy([1, 1, 1]))
    plan = InjectPlan(count, size, BENCH_DOMAIN)
    r = run_measurement(Measure(policy, sink, plan, fsync=fsync, progress=False), work)
    return {
        "mode": "kumopy" + ("" if fsync else " --no-fsync"),
        "messages": r["delivered"],
        "rejected": r["injection"]["rejected"],
        "seconds": r["seconds"],
        "rate": r["rate"],
        "inject_rate": r["injection"]["rate"],
        "per_source": {name: s["rate"] for name, s in sorted(r["sources"].items())},
        "cpu_us_per_msg": r["cpu"]["us_per_msg"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every mode once, print a table and save the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--sink", choices=("auto", "smtp-sink", "kumopy"), default="auto")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kumopy-bench-") as tmp:
        sink = start_bench_sink(Path(tmp) / "sink", args.sink)
        try:
            raw = run_ceiling(sink, args.count, args.size, 300.0)
            if raw:
                results.append({**raw, "mode": "smtp-source (raw C sender)"})
            for fsync, name in ((True, "durable"), (False, "nofsync")):
                results.append(run_kumopy(Path(tmp) / name, sink, args.count, args.size, fsync))
        finally:
            sink.stop()
    base = results[0]["rate"]
    print(f"{args.count} messages of {args.size} bytes, 3 sources, one {sink.info['kind']} sink")
    print(f"{'mode':32} {'msg/s':>9} {'ratio':>7}  per source (msg/s)")
    for r in results:
        per = " ".join(f"{ip}={v or 0:,.0f}" for ip, v in r.get("per_source", {}).items())
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
