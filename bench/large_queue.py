"""Issue 12's large queue: a million deferred messages, a restart, then the drain.

    python -m bench.large_queue --count 1000000 [--size 2048] [--fresh-count 100000] [--cold]

1. defer: `count` messages for one destination whose server answers every MAIL FROM with
   451 (kumopy's sink, --refuse-from); wait until all of them are deferred (retry in 1 h) and
   measure the coordinator's memory per queued message.
2. restart: SIGTERM, start again on the same spool; time until an injection is answered ok,
   until the workers are ready, and until every message is back in its queue; memory again.
   With --cold, once more after dropping the spool's files from the OS page cache.
3. drain: SIGTERM, make every deferred message due now (an UPDATE of the spool's `due`
   column, done by the benchmark while no coordinator runs), start against an accepting sink
   (Postfix's smtp-sink when installed, else kumopy's) and time the drain.
4. fresh: the same setup on an empty spool, `fresh-count` messages injected and delivered.

Memory: RssAnon is the heap (Python objects, SQLite's own page cache of at most
`PRAGMA cache_size`, 2 MiB by default); the OS page cache of spool.db is not in RSS (SQLite
reads it with pread) and the WAL index (-shm) is in RssShmem, so RssAnon growth is the
coordinator's cost per queued message. Prints a table, writes bench/results/large-queue-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.memory_queue import POLICY
from bench.procmem import memory
from kumopy.benchsink import free_port, start_bench_sink
from kumopy.client import Client, Message
from kumopy.harness import Proc, start_sink, wait_for
from kumopy.inject import make_body

__all__ = ["main"]

SOURCE_IP = "127.0.0.2"


class Bench:
    """One run's directories, processes and settings."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.policy = work / "policy.py"
        self.policy.write_text(POLICY)
        self.procs: list[Proc] = []
        self.body = make_body("s@src.test", "x", args.size, 0)

    def messages(self, count: int, start: int = 0) -> Iterator[list[Message]]:
        """Yield batches of `count` messages for the benchmark's domains."""
        domains = self.args.domains
        msgs = (
            Message("s@src.test", [f"r{i}@d{i % domains}.test"], self.body)
            for i in range(start, start + count)
        )
        return iter(lambda: [m for _, m in zip(range(500), msgs, strict=False)], [])

    def coordinator(self, name: str, dest: str) -> tuple[Proc, str, float]:
        """Start `kumopy run` on a fixed port; return it, its endpoint and its start time."""
        workdir = self.work / name
        workdir.mkdir(parents=True, exist_ok=True)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "kumopy", "run", str(self.policy), "--listen", endpoint]
        cmd += ["--ready-file", str(workdir / "ready"), "--spool", str(self.work / "spool")]
        cmd += ["--log-dir", str(workdir / "log"), "--log-level", "WARNING"]
        cmd += ["--heartbeat-timeout", "3600"]
        if not self.args.durable:
            cmd.append("--no-fsync")
        started = time.monotonic()
        popen = subprocess.Popen(cmd, env={**os.environ, "BENCH_DEST": dest})
        proc = Proc(popen, "coordinator", {"ready_file": workdir / "ready"})
        self.procs.append(proc)
        return proc, endpoint, started

    def stop(self, proc: Proc) -> float:
        """SIGTERM a process and wait for it; return the seconds it took."""
        t0 = time.monotonic()
        proc.stop(600)
        self.procs.remove(proc)
        return time.monotonic() - t0


def _status(c: Client) -> dict[str, Any]:
    st: dict[str, Any] = c.request("status", queues_limit=0)
    return st


def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` (no fixed sleeps beyond the poll interval); return when it held."""
    wait_for(cond, timeout, what, interval=0.05)
    return time.monotonic()


def _inject(bench: Bench, c: Client, count: int, start: int = 0) -> float:
    t0 = time.monotonic()
    for chunk in c.send_batches(bench.messages(count, start), window=4):
        if not all(r.ok for r in chunk):
            raise SystemExit(f"injection refused: {[r for r in chunk if not r.ok][:1]}")
    return time.monotonic() - t0


def phase_defer(bench: Bench, dest: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Inject `count` messages for the refusing destination; wait until all are deferred."""
    n = bench.args.count
    proc, endpoint, _ = bench.coordinator("defer", dest)
    wait_for(proc.info["ready_file"].exists, 120, "the coordinator")
    with Client(endpoint, timeout=600) as c:
        base = memory(proc.pid)
        inject = _inject(bench, c, n)
        t0 = time.monotonic() - inject
        deferred = _until(lambda: _status(c)["delayed"] == n, 3600, "all to be deferred") - t0
        mem = memory(proc.pid)
    stop = bench.stop(proc)
    figures = {
        "inject_seconds": round(inject, 1),
        "inject_rate": round(n / inject),
        "all_deferred_seconds": round(deferred, 1),
        "stop_seconds": round(stop, 1),
        **_mem_figures(base, mem, n),
    }
    return figures, base


def _mem_figures(base: dict[str, int], mem: dict[str, int], n: int) -> dict[str, Any]:
    return {
        "rss_base_mib": round(base["rss"] / 2**20, 1),
        "rss_mib": round(mem["rss"] / 2**20, 1),
        "pss_mib": round(mem["pss"] / 2**20, 1),
        "anon_mib": round(mem["rssanon"] / 2**20, 1),
        "file_shmem_mib": round((mem["rssfile"] + mem["rssshmem"]) / 2**20, 1),
        "rss_bytes_per_msg": round((mem["rss"] - base["rss"]) / n),
        "anon_bytes_per_msg": round((mem["rssanon"] - base["rssanon"]) / n),
    }


def evict(spool: Path) -> None:
    """Drop the spool's files from the OS page cache (a restart after a reboot reads disk)."""
    for path in spool.glob("spool.db*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def phase_restart(
    bench: Bench, dest: str, base: dict[str, int], probes: int, cold: bool = False
) -> dict[str, Any]:
    """Restart on the full spool: time to the first accepted injection and to full recovery."""
    n = bench.args.count + probes
    if cold:
        evict(bench.work / "spool")
    proc, endpoint, started = bench.coordinator("restart-cold" if cold else "restart", dest)
    with Client(endpoint, timeout=600) as c:
        # One message, sent as soon as the process exists: its answer is the readiness.
        ok = c.send("s@src.test", ["probe@d0.test"], bench.body)
        inject_ok = time.monotonic() - started
        if not ok.ok:
            raise SystemExit(f"probe refused: {ok}")
        workers = _until(proc.info["ready_file"].exists, 600, "the workers") - started
        total = n
        recovered = _until(
            lambda: _status(c)["delayed"] == total, 3600, "every message back in its queue"
        )
        mem = memory(proc.pid)
    stop = bench.stop(proc)
    return {
        "cold": cold,
        "ready_to_inject_seconds": round(inject_ok, 2),
        "workers_ready_seconds": round(workers, 2),
        "all_queued_seconds": round(recovered - started, 2),
        "stop_seconds": round(stop, 1),
        **_mem_figures(base, mem, total),
    }


def make_due(spool: Path) -> float:
    """Make every spooled message due now (the coordinator is stopped); return the seconds."""
    t0 = time.monotonic()
    db = sqlite3.connect(spool / "spool.db", isolation_level=None)
    db.execute("UPDATE msg SET due = 0")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - t0


def _drain(c: Client, total: int, started: float) -> dict[str, Any]:
    """Poll until nothing is left; return the drain's timings and its steady rate."""
    marks: list[tuple[float, int]] = []

    def empty() -> bool:
        st = _status(c)
        marks.append((time.monotonic(), st["messages"]))
        return bool(st["messages"] == 0)

    _until(empty, 7200, "the queue to drain")
    # The steady rate: from 10 % to 90 % delivered, so start-up and the tail do not count.
    t10 = next(t for t, left in marks if left <= total * 0.9)
    t90 = next(t for t, left in marks if left <= total * 0.1)
    end = marks[-1][0]
    return {
        "seconds": round(end - started, 1),
        "rate": round(total / (end - started)),
        "steady_rate": round(total * 0.8 / max(t90 - t10, 1e-3)),
    }


def phase_drain(bench: Bench, dest: str) -> dict[str, Any]:
    """Restart against an accepting sink with everything due; time the drain."""
    total = bench.args.count + (2 if bench.args.cold else 1)
    update = make_due(bench.work / "spool")
    proc, endpoint, started = bench.coordinator("drain", dest)
    with Client(endpoint, timeout=600) as c:
        wait_for(proc.info["ready_file"].exists, 600, "the coordinator")
        out = _drain(c, total, started)
    bench.stop(proc)
    return {"make_due_seconds": round(update, 1), **out}


def phase_fresh(bench: Bench, dest: str) -> dict[str, Any]:
    """Inject `fresh-count` messages into an empty spool with the sink accepting."""
    shutil.rmtree(bench.work / "spool")
    n = bench.args.fresh_count
    proc, endpoint, _ = bench.coordinator("fresh", dest)
    wait_for(proc.info["ready_file"].exists, 120, "the coordinator")
    with Client(endpoint, timeout=600) as c:
        started = time.monotonic()
        inject = _inject(bench, c, n)
        out = _drain(c, n, started)
    bench.stop(proc)
    return {"count": n, "inject_rate": round(n / inject), **out}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the four phases; return every figure."""
    work = Path(tempfile.mkdtemp(prefix="kumopy-large-", dir=args.dir))
    bench = Bench(args, work)
    try:
        refusing = start_sink(
            work / "sink451",
            extra=["--refuse-from", SOURCE_IP, "--refuse-reply", "451 4.3.0 try again later"],
        )
        bench.procs.append(refusing)
        dest451 = f"127.0.0.1:{refusing.info['port']}"
        out: dict[str, Any] = {"count": args.count, "size": args.size, "domains": args.domains}
        out["defer"], base = phase_defer(bench, dest451)
        out["restart"] = phase_restart(bench, dest451, base, 1)
        if args.cold:
            out["restart_cold"] = phase_restart(bench, dest451, base, 2, cold=True)
        accepting = start_bench_sink(work / "sink", args.sink)
        bench.procs.append(accepting)
        out["sink"] = accepting.info["kind"]
        dest = f"127.0.0.1:{accepting.info['port']}"
        out["drain"] = phase_drain(bench, dest)
        if args.fresh_count:
            out["fresh"] = phase_fresh(bench, dest)
        return out
    finally:
        for proc in reversed(bench.procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run, print a table and save the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--domains", type=int, default=1, help="recipient domains (queues)")
    p.add_argument("--fresh-count", type=int, default=100_000, help="0: skip the fresh run")
    p.add_argument("--sink", choices=("auto", "smtp-sink", "kumopy"), default="auto")
    p.add_argument("--durable", action="store_true", help="fsync (default --no-fsync)")
    p.add_argument("--cold", action="store_true", help="also restart with the spool uncached")
    p.add_argument("--dir", default=None, help="where the spool goes (default: a temp dir)")
    args = p.parse_args(argv)
    out = run(args)
    d, r, dr = out["defer"], out["restart"], out["drain"]
    print(f"{args.count} messages of {args.size} B, {args.domains} domain(s), {out['sink']} sink")
    print(f"inject            {d['inject_rate']:>10,} msg/s   ({d['inject_seconds']} s)")
    print(f"all deferred      {d['all_deferred_seconds']:>10} s")
    print(f"deferred: RSS     {d['rss_mib']:>10} MiB    {d['rss_bytes_per_msg']} B/msg")
    print(f"deferred: anon    {d['anon_mib']:>10} MiB    {d['anon_bytes_per_msg']} B/msg")
    print(f"restart: inject   {r['ready_to_inject_seconds']:>10} s")
    print(f"restart: workers  {r['workers_ready_seconds']:>10} s")
    print(f"restart: queued   {r['all_queued_seconds']:>10} s")
    print(f"restart: anon     {r['anon_mib']:>10} MiB    {r['anon_bytes_per_msg']} B/msg")
    if "restart_cold" in out:
        rc = out["restart_cold"]
        print(f"cold restart      {rc['ready_to_inject_seconds']:>10} s (spool not cached)")
    print(f"drain             {dr['rate']:>10,} msg/s   steady {dr['steady_rate']:,}")
    if "fresh" in out:
        f = out["fresh"]
        print(f"fresh ({f['count']})   {f['rate']:>10,} msg/s   steady {f['steady_rate']:,}")
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (res / f"large-queue-{stamp}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
