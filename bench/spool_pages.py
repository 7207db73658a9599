"""The spool's cost per message by SQLite page size: insert, reschedule, recover, delete.

Run: .venv/bin/python -m bench.spool_pages [--count 50000] [--size 2048] [--rounds 3] [--fsync]
Each round measures every page size once, in turn (A/B/C/D, then again), on a fresh
SpoolStore, in the batch sizes the coordinator uses: 256 messages per insert commit, 2000
outcomes per outcome commit. Prints the median of the rounds and the spool file's size;
writes bench/results/spool-pages-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kumopy.coordinator import spool
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.inject import make_body

__all__ = ["main", "measure"]

_INSERT_BATCH = 256
_OUTCOME_BATCH = 2000


def _env(i: int) -> SpooledMeta:
    return SpooledMeta("s@src.test", [f"r{i}@d0.test"], {}, "d0.test", time.time())


def measure(
    page: int, count: int, body: bytes, fsync: bool, where: str | None, shuffle: bool = False
) -> dict[str, Any]:
    """Fill a fresh spool of `page`-byte pages, then time each operation; return µs/msg."""
    spool.PAGE_SIZE = page
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = SpoolStore(tmp, fsync=fsync)
        ids = [f"{i:026x}" for i in range(count)]
        t0 = time.perf_counter()
        for k in range(0, count, _INSERT_BATCH):
            store.insert_batch([(m, _env(0), 0.0, body) for m in ids[k : k + _INSERT_BATCH]])
        t1 = time.perf_counter()
        order = list(ids)
        if shuffle:  # outcomes in any order, as with many queues and retries
            random.Random(1).shuffle(order)
        half = order[: count // 2]
        for k in range(0, len(half), _OUTCOME_BATCH):
            chunk = half[k : k + _OUTCOME_BATCH]
            store.apply_outcomes([], [(m, _env(0), 1e12, 1) for m in chunk])
        t2 = time.perf_counter()
        store.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("spool.db*"))
        store = SpoolStore(tmp, fsync=fsync)
        t3 = time.perf_counter()
        recovered = sum(1 for _ in store.recover())
        t4 = time.perf_counter()
        for k in range(0, count, _OUTCOME_BATCH):
            store.apply_outcomes(order[k : k + _OUTCOME_BATCH], [])
        t5 = time.perf_counter()
        store.close()
    assert recovered == count
    us = 1e6 / count
    return {
        "page_size": page,
        "insert_us": round((t1 - t0) * us, 1),
        "reschedule_us": round((t2 - t1) * 1e6 / max(len(half), 1), 1),
        "recover_us": round((t4 - t3) * us, 1),
        "delete_us": round((t5 - t4) * us, 1),
        "bytes_per_msg": round(size / count),
    }


def main(argv: list[str] | None = None) -> int:
    """Alternate the page sizes over the rounds; print medians."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pages", default="4096,8192,16384,32768")
    p.add_argument("--fsync", action="store_true", help="durable commits (default: none)")
    p.add_argument("--shuffle", action="store_true", help="outcomes in random order")
    p.add_argument("--dir", default=None, help="where to test (default: a temp dir)")
    args = p.parse_args(argv)
    body = make_body("s@src.test", "r@d0.test", args.size, 0)
    pages = [int(x) for x in args.pages.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {pg: [] for pg in pages}
    for _ in range(args.rounds):
        for pg in pages:
            runs[pg].append(measure(pg, args.count, body, args.fsync, args.dir, args.shuffle))
    keys = ("insert_us", "reschedule_us", "recover_us", "delete_us", "bytes_per_msg")
    print(
        f"{args.count} messages of {args.size} B, fsync={args.fsync}, "
        f"shuffle={args.shuffle}, median of {args.rounds}"
    )
    print(f"{'page':>6} " + " ".join(f"{k:>14}" for k in keys))
    table = []
    for pg in pages:
        row = {k: statistics.median(r[k] for r in runs[pg]) for k in keys}
        table.append({"page_size": pg, **row, "runs": runs[pg]})
        print(f"{pg:>6} " + " ".join(f"{row[k]:>14}" for k in keys))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"spool-pages-{stamp}.json").write_text(
        json.dumps({**vars(args), "table": table}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
