"""End-to-end cost of rates and caps that are configured but never reached, in one run.

Run: .venv/bin/python -m bench.limits_overhead [--count 20000] [--rounds 2]
Alternates kumopy on the same synthetic policy of 4 sources without limits and with every
pick-time limit configured far above the load (per path message and selection rates, a
source selection rate, a warm-up cap, the queue's own rate), into one sink; prints each run
and the ratio of the medians, and writes bench/results/limits-overhead-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kumopy.benchinject import InjectPlan
from kumopy.benchpolicy import BENCH_DOMAIN, synthetic_policy
from kumopy.benchrun import Measure, run_measurement
from kumopy.benchsink import start_bench_sink


def limited_policy(weights: list[int]) -> str:
    """Return the synthetic policy with every pick-time limit configured and unreachable.

    Rates a million times the load and a warm-up cap of 10^12: every check runs, none refuses.
    """
    text = synthetic_policy(weights)
    text = text.replace(
        'ehlo_domain=s["name"] + ".',
        'source_selection_rate="1000000/s", '
        'warmup={"start": 0, "daily": [10**12]}, ehlo_domain=s["name"] + ".',
    )
    text = text.replace(
        "return kumo.make_queue_config(egress_pool=",
        'return kumo.make_queue_config(max_message_rate="1000000/s", egress_pool=',
    )
    assert "warmup" in text and "max_message_rate" in text, "the synthetic policy changed"
    return (
        text
        + """

@kumo.on("get_egress_path_config")
def get_egress_path_config(routing_domain, egress_source, site_name):
    return kumo.make_egress_path(max_message_rate="1000000/s", source_selection_rate="1000000/s")
"""
    )


def main(argv: list[str] | None = None) -> int:
    """Alternate runs without and with limits; print the rates and their ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    weights = [1, 1, 1, 1]
    runs: dict[str, list[float]] = {"no limits": [], "limits configured": []}
    with tempfile.TemporaryDirectory(prefix="kumopy-limits-") as tmp:
        sink = start_bench_sink(Path(tmp) / "sink", "auto")
        try:
            for r in range(args.rounds):
                for mode, text in (
                    ("no limits", synthetic_policy(weights)),
                    ("limits configured", limited_policy(weights)),
                ):
                    work = Path(tmp) / f"{r}-{mode.replace(' ', '-')}"
                    work.mkdir()
                    policy = work / "policy.py"
                    policy.write_text(text)
                    plan = InjectPlan(args.count, 2048, BENCH_DOMAIN)
                    result = run_measurement(Measure(policy, sink, plan, progress=False), work)
                    runs[mode].append(result["rate"])
                    print(f"round {r + 1}: {mode:18} {result['rate']:8,.0f} msg/s", flush=True)
        finally:
            sink.stop()
    medians = {mode: statistics.median(rates) for mode, rates in runs.items()}
    ratio = medians["limits configured"] / medians["no limits"]
    print(
        f"median: no limits {medians['no limits']:,.0f} msg/s, limits configured "
        f"{medians['limits configured']:,.0f} msg/s: ratio {ratio:.3f}"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(__file__).parent / "results" / f"limits-overhead-{stamp}.json"
    data: dict[str, Any] = {"count": args.count, "runs": runs, "medians": medians, "ratio": ratio}
    out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
