"""Start-up time, memory (PSS) and idle CPU of N workers, forked by the zygote vs exec'd.

    python -m bench.workers_memory --sources 256 [--modes zygote,no-zygote] [--idle 20]
        [--run-arg=--heartbeat-timeout=30]

Each mode starts `kumopy run` with N synthetic sources on 127.0.0.2 upwards (plus the
`unspecified` source's worker), waits until every worker said Ready (the ready file, then
the status endpoint's pids), reads PSS and USS from /proc/PID/smaps_rollup for the
coordinator, the zygote and every worker, then the CPU (utime + stime from /proc/PID/stat)
the idle processes use over `--idle` seconds. Prints a table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procmem import memory
from kumopy.benchpolicy import synthetic_policy
from kumopy.client import Client
from kumopy.harness import Proc, start_coordinator

__all__ = ["cpu_seconds", "main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    """Return the CPU time a process's live threads used so far, to the nanosecond.

    /proc/PID/stat's utime + stime come in clock ticks (10 ms), rounded per process: an idle
    worker's few milliseconds would read as nothing. schedstat counts nanoseconds per thread.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9


def _children(pid: int) -> dict[int, str]:
    """Return the coordinator's children by pid, each with its role from the command line."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            comm = Path(f"/proc/{child}/comm").read_text().strip()
            role = "worker" if comm == "kumopy-worker" or b"worker" in cmd else "other"
            if role == "other" and b"zygote" in cmd:
                role = "zygote"
            elif role == "other" and b"resolver" in cmd:
                role = "resolver"
            found[int(child)] = role
    return found


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def measure(
    sources: int,
    zygote: bool,
    idle: float,
    workdir: Path,
    settle: float = 5.0,
    run_args: list[str] | None = None,
) -> dict[str, Any]:
    """Start one coordinator with `sources` sources; return its start-up, memory and CPU."""
    workdir.mkdir(parents=True)
    policy = workdir / "policy.py"
    policy.write_text(synthetic_policy([1] * sources))
    # Exec'd workers take minutes to boot on a small host: give both modes room to.
    extra = ["--no-fsync", "--log-level", "WARNING", "--boot-timeout", "600", *(run_args or [])]
    if not zygote:
        extra.append("--no-zygote")
    started = time.monotonic()
    with open(workdir / "coordinator.log", "wb") as err:
        coord: Proc = start_coordinator(workdir, str(policy), extra=extra, stderr=err, timeout=900)
    try:
        ready = time.monotonic() - started
        with Client(coord.info["endpoint"]) as client:
            pids = {n: p for n, p in client.request("status")["workers"].items() if p}
        roles = _children(coord.pid)
        zygotes = [p for p, r in roles.items() if r == "zygote"]
        everyone = [coord.pid, *zygotes, *pids.values()]
        boot_cpu = sum(cpu_seconds(p) for p in everyone[1:])
        # Past their first beats (every second until nothing changes), workers are idle.
        time.sleep(settle)
        mem = {p: memory(p) for p in everyone}
        cpu0 = {p: cpu_seconds(p) for p in everyone}
        t0 = time.monotonic()
        time.sleep(idle)
        span = time.monotonic() - t0
        cpu = {p: cpu_seconds(p) - cpu0[p] for p in everyone}
        with Client(coord.info["endpoint"]) as client:
            after = {n: p for n, p in client.request("status")["workers"].items() if p}
    finally:
        coord.stop(60)
    workers = list(pids.values())
    pss = [mem[p]["pss"] for p in workers]
    uss = [mem[p]["uss"] for p in workers]
    return {
        "mode": "zygote" if zygote else "no-zygote",
        "run_args": run_args or [],
        "sources": sources,
        "workers": len(workers),
        "restarted": sum(1 for n, p in after.items() if pids.get(n) != p),
        "ready_seconds": round(ready, 2),
        "boot_cpu_seconds": round(boot_cpu, 2),
        "coordinator": mem[coord.pid],
        "zygote": mem[zygotes[0]] if zygotes else None,
        "workers_pss_total": sum(pss),
        "worker_pss_mean": statistics.fmean(pss),
        "worker_uss_mean": statistics.fmean(uss),
        "worker_rss_mean": statistics.fmean(mem[p]["rss"] for p in workers),
        "all_pss_total": sum(m["pss"] for m in mem.values()),
        "idle_seconds": round(span, 2),
        "idle_cpu_workers": sum(cpu[p] for p in workers) / span,
        "idle_cpu_coordinator": cpu[coord.pid] / span,
        "idle_cpu_zygote": sum(cpu[p] for p in zygotes) / span,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| mode | workers | ready | boot CPU | PSS/worker | USS/worker | RSS/worker | "
        "zygote PSS | coordinator PSS | all PSS | idle CPU workers | idle CPU coordinator |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        zyg = _mib(r["zygote"]["pss"]) + " MiB" if r["zygote"] else "-"
        mode = " ".join([r["mode"], *r["run_args"]])
        lines.append(
            f"| {mode} | {r['workers']} | {r['ready_seconds']:.1f} s | "
            f"{r['boot_cpu_seconds']:.1f} s | {_mib(r['worker_pss_mean'])} MiB | "
            f"{_mib(r['worker_uss_mean'])} MiB | {_mib(r['worker_rss_mean'])} MiB | {zyg} | "
            f"{_mib(r['coordinator']['pss'])} MiB | {_mib(r['all_pss_total'])} MiB | "
            f"{100 * r['idle_cpu_workers']:.2f}% | {100 * r['idle_cpu_coordinator']:.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    """Measure each mode in turn, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sources", type=int, default=256)
    p.add_argument("--modes", default="zygote,no-zygote", help="comma-separated, in this order")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    p.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="pass a flag to kumopy run (repeatable), e.g. --run-arg=--heartbeat-timeout=30",
    )
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"zygote", "no-zygote"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="kumopy-workers-"))
    rows = []
    try:
        for mode in modes:
            row = measure(
                args.sources, mode == "zygote", args.idle, work / mode, args.settle, args.run_arg
            )
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"workers-memory-{args.sources}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"sources": args.sources, "cpus": os.cpu_count(), "rows": rows}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
