"""`kumopy bench`: parse its arguments, run one benchmark or a sweep, report them."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kumopy.benchinject import InjectPlan
from kumopy.benchpolicy import (
    BENCH_DOMAIN,
    expected_shares,
    only_source_policy,
    plan_policy,
    synthetic_policy,
)
from kumopy.benchreport import (
    chart_sources,
    chart_sweep,
    format_report,
    format_sweep,
    write_json,
)
from kumopy.benchrun import Measure, run_measurement
from kumopy.benchsink import run_ceiling, start_bench_sink
from kumopy.errors import KumoError

__all__ = ["add_bench_parser", "parse_list", "run_bench"]

SWEEP_SOURCES = "1,4,16,64,256"
SWEEP_SIZES = "2k,100k"


def parse_list(text: str, item: Any = int) -> list[Any]:
    """Parse "1,4,16" (or "2k,100k" with a size parser) into a list; an argparse type."""
    try:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
    return values


def _sizes(text: str) -> list[int]:
    from kumopy.cli import parse_size

    return parse_list(text, parse_size)


def _spool_fs(path: Path) -> str:
    """Return the file system type the spool is on (tmpfs makes fsync free)."""
    best, kind = "", "unknown file system"
    real = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        inside = len(parts) > 2 and (real + "/").startswith(parts[1].rstrip("/") + "/")
        if inside and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def _sink_sessions(workers: int) -> int:
    """smtp-sink's -m: every connection the workers may open (32 each), within our fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(4096, 32 * workers + 64)
    return want if soft == resource.RLIM_INFINITY else min(want, max(256, soft - 64))


def run_bench(
    args: argparse.Namespace, size: int, n_sources: int | None, count: int | None = None
) -> dict[str, Any]:
    """Run one benchmark: a sink, the policy together (and each source alone), the ceiling."""
    count = count or args.count
    base = Path(tempfile.mkdtemp(prefix="kumopy-bench-", dir=args.workdir))
    sink = None
    try:
        if n_sources is not None:
            weights = args.weights or [1] * n_sources
            if len(weights) != n_sources:
                raise KumoError(f"--weights gives {len(weights)} weights for {n_sources} sources")
            policy = base / "policy.py"
            policy.write_text(synthetic_policy(weights))
            label = f"{n_sources} synthetic source{'s' if n_sources != 1 else ''}"
        else:
            policy = Path(args.policy).resolve()
            label = str(args.policy)
        plan = plan_policy(policy)
        sink = start_bench_sink(base / "sink", args.sink, _sink_sessions(len(plan.sources)))
        measure = Measure(
            policy=policy,
            sink=sink,
            plan=InjectPlan(count, size, args.domain, tuple(args.tenant), args.campaign),
            injectors=args.injectors,
            fsync=args.fsync,
            startup_timeout=args.startup_timeout or 60.0 + 1.0 * len(plan.sources),
            timeout=args.timeout or max(120.0, count * size / 2e6 + count / 500),
            progress=not args.quiet,
            label=f"{label}, {size:,} B",
            run_args=tuple(args.run_arg),
        )
        # Short directory names: the coordinator puts ipc sockets in them (108 bytes at most).
        together = run_measurement(measure, base / "all")
        each: dict[str, dict[str, Any]] = {}
        if args.each:
            for i, name in enumerate(plan.sources):
                only = base / f"only{i}.py"
                only.write_text(only_source_policy(str(policy), name))
                alone = replace(
                    measure,
                    policy=only,
                    plan=replace(measure.plan, count=args.each_count or count),
                    label=f"{name} alone",
                )
                each[name] = run_measurement(alone, base / f"e{i}")
        ceiling = run_ceiling(sink, count, size, measure.timeout)
        result = _summary(together, each, ceiling, plan, label, sink.info["kind"], base)
        result["sink_pid"] = sink.pid
        return result
    finally:
        if sink is not None:
            sink.stop()
        if args.keep:
            print(f"work files kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def _summary(
    together: dict[str, Any],
    each: dict[str, dict[str, Any]],
    ceiling: dict[str, Any] | None,
    plan: Any,
    label: str,
    sink: str,
    base: Path,
) -> dict[str, Any]:
    """Put one benchmark's runs together: per-source rows, shares against weights, ratio."""
    shares = expected_shares(plan.config, together["pools"])
    weights: dict[str, dict[str, int]] = {}
    for pool in plan.config.pools.values():
        for e in pool.entries:
            weights.setdefault(e.name, {})[pool.name] = e.weight
    delivered = max(1, together["delivered"])
    rows = []
    for name in plan.sources:
        got = together["sources"].get(name, {})
        rows.append(
            {
                "name": name,
                "address": plan.addresses.get(name),
                "weights": weights.get(name, {}),
                "expected_share": shares.get(name),
                "delivered": got.get("delivered", 0),
                "share": got.get("delivered", 0) / delivered,
                "rate": got.get("rate"),
                "span": got.get("span"),
                "alone_rate": _alone_rate(each.get(name), name),
            }
        )
    pids = [p for run in [together, *each.values()] for ids in run["pids"].values() for p in ids]
    return {
        **{k: v for k, v in together.items() if k not in ("sources", "pids")},
        "policy_label": label,
        "sink": sink,
        "spool_fs": _spool_fs(base),
        "sources": rows,
        "ceiling": ceiling,
        "ratio": together["rate"] / ceiling["rate"] if ceiling else None,
        "each": each,
        "all_pids": sorted(set(pids)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _alone_rate(run: dict[str, Any] | None, name: str) -> float | None:
    if run is None:
        return None
    rate: float | None = run["sources"].get(name, {}).get("rate")
    return rate


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM would end the process without running the clean-up in `finally` blocks.
    raise KeyboardInterrupt


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.sweep and args.policy:
        raise KumoError("--sweep runs synthetic policies only; leave out the policy file")
    if not (args.sweep or args.policy or args.sources):
        raise KumoError("give your policy file, or --sources N for a synthetic one (or --sweep)")
    if args.policy and args.sources:
        raise KumoError("give either a policy file or --sources N, not both")
    signal.signal(signal.SIGTERM, _terminate)
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not args.sweep:
        result = run_bench(args, args.size, args.sources)
        print(format_report(result))
        print(f"\nJSON: {write_json(result, out, f'bench-{stamp}')}")
        png = chart_sources(result, out / f"bench-{stamp}.png")
        if png is not None:
            print(f"chart: {png}")
        return 0 if result["delivered"] >= result["injection"]["accepted"] else 1
    points: list[dict[str, Any]] = []
    for size in args.sweep_sizes:
        # Every size sends the bytes of --count messages of 2 KB (at least 1,000 messages):
        # 200,000 messages of 100 KB would be 20 GB through the spool for one point.
        count = max(1000, min(args.count, args.count * 2048 // size))
        for n in args.sweep_sources:
            try:
                point = run_bench(args, size, n, count)
            except KumoError as exc:  # one point failing (e.g. 256 workers) keeps the others
                print(f"kumopy bench: {n} sources, {size:,} B: {exc}", file=sys.stderr)
                point = {"error": str(exc)}
            points.append({**point, "sources_n": n, "size": size})
    print(format_sweep(points))
    print(f"\nJSON: {write_json({'sweep': points}, out, f'sweep-{stamp}')}")
    png = chart_sweep(points, out / f"sweep-{stamp}.png")
    if png is not None:
        print(f"chart: {png}")
    return 0 if all("error" not in p for p in points) else 1


def add_bench_parser(sub: Any) -> None:
    """Register the `bench` subcommand."""
    from kumopy.cli import parse_size

    p = sub.add_parser(
        "bench",
        help="benchmark throughput per source into a local sink",
        description="Benchmark your policy (or --sources N synthetic ones) into a sink on "
        "loopback: rate per source, share against weights, latency, CPU, and the smtp-source "
        "ceiling in the same run.",
    )
    p.add_argument(
        "policy", nargs="?", help="your policy file (Python); every queue goes to the sink"
    )
    p.add_argument("--sources", type=int, metavar="N", help="a synthetic policy of N sources")
    p.add_argument("--weights", type=parse_list, help="synthetic weights, e.g. 1,2,3")
    p.add_argument("--count", type=int, default=20_000, help="messages to send")
    p.add_argument("--size", type=parse_size, default=2048, help="bytes per message (2k, 100k)")
    p.add_argument("--injectors", type=int, default=2, help="injecting processes")
    p.add_argument("--each", action="store_true", help="also measure each source alone")
    p.add_argument("--each-count", type=int, help="messages per --each run (default --count)")
    p.add_argument(
        "--sink",
        choices=("auto", "smtp-sink", "kumopy"),
        default="auto",
        help="Postfix's smtp-sink when installed (auto), or kumopy's own",
    )
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="spool without fsync")
    p.add_argument("--domain", default=BENCH_DOMAIN, help="recipient domain of the messages")
    p.add_argument("--tenant", action="append", default=[], help="tenant (repeatable: cycled)")
    p.add_argument("--campaign", help="campaign of every message")
    p.add_argument("--out", default="kumopy-bench-results", help="JSON and PNG go here")
    p.add_argument("--workdir", help="spool and logs go under here (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the spool and logs")
    p.add_argument("--timeout", type=float, help="seconds for the deliveries of one run")
    p.add_argument("--startup-timeout", type=float, help="seconds for every worker's Ready")
    p.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="pass a flag to kumopy run, e.g. --run-arg=--heartbeat-timeout=120 (repeatable)",
    )
    p.add_argument("--sweep", action="store_true", help="sweep sources and sizes")
    p.add_argument("--sweep-sources", type=parse_list, default=SWEEP_SOURCES)
    p.add_argument("--sweep-sizes", type=_sizes, default=SWEEP_SIZES)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)
