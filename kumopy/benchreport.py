"""`kumopy bench`'s output: the table, the JSON file and the charts (matplotlib, optional)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kumopy.textable import table

__all__ = [
    "chart_sources",
    "chart_sweep",
    "format_report",
    "format_sweep",
    "human_rate",
    "human_seconds",
    "write_json",
]

log = logging.getLogger(__name__)


def human_rate(value: float | None) -> str:
    """Format messages per second: "12,345/s", or "-" when unknown."""
    return "-" if value is None else f"{value:,.0f}/s"


def human_seconds(value: float | None) -> str:
    """Format a duration: "850 ms" under a second, "1.25 s" above, "-" when unknown."""
    if value is None:
        return "-"
    return f"{value * 1000:,.0f} ms" if value < 1.0 else f"{value:,.2f} s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _weights(by_pool: dict[str, int]) -> str:
    if len(by_pool) == 1:
        return str(next(iter(by_pool.values())))
    return ", ".join(f"{w} in {pool}" for pool, w in by_pool.items()) or "-"


def format_report(r: dict[str, Any]) -> str:
    """Return the human report of one benchmark (one policy, one size)."""
    inj = r["injection"]
    lines = [
        f"kumopy bench: {r['policy_label']}, {r['count']:,} messages of {r['size']:,} bytes, "
        f"{r['injectors']} injector processes, {'durable spool' if r['fsync'] else 'NO fsync'} "
        f"({r['spool_fs']}), sink {r['sink']}",
        f"start-up: {r['workers']} workers ready in {human_seconds(r['startup_seconds'])}",
        f"injection: {inj['accepted']:,} accepted, {inj['rejected']:,} rejected in "
        f"{human_seconds(inj['seconds'])} ({human_rate(inj['rate'])})",
        f"delivery: {r['delivered']:,} delivered in {human_seconds(r['seconds'])} "
        f"({human_rate(r['rate'])} end to end, first injection to last delivery)",
    ]
    if r.get("run_args"):
        lines.insert(1, f"kumopy run flags: {' '.join(r['run_args'])}")
    ceiling = r.get("ceiling")
    if ceiling:
        lines.append(
            f"ceiling: smtp-source ({ceiling['sessions']} sessions, C, no spool) into the same "
            f"sink: {human_rate(ceiling['rate'])}; kumopy / ceiling = {r['ratio']:.2f}"
        )
    else:
        lines.append("ceiling: smtp-source is not installed; no ratio")
    lat = r["latency"]
    lines.append(
        f"latency, injection to delivery ({lat['messages']:,} messages): "
        f"p50 {human_seconds(lat['p50'])}, p99 {human_seconds(lat['p99'])}, "
        f"max {human_seconds(lat['max'])}"
    )
    if r["clock"] != "event_time":
        lines.append(
            "  note: the log has no event_time; latencies come from `timestamp`, whole seconds, "
            "so they are only good to about 1 s; per-source spans come from "
            f"{r['span_from']}"
        )
    if r["other_records"]:
        lines.append(f"other log records: {r['other_records']}")
    if r["failures"]:
        lines.append(f"worker failures: {r['failures']}")
    rows = []
    for s in r["sources"]:
        rows.append(
            [
                s["name"],
                s["address"] or "-",
                _weights(s["weights"]),
                _pct(s["expected_share"]),
                f"{s['delivered']:,}",
                _pct(s["share"]),
                human_rate(s["rate"]),
                human_rate(s.get("alone_rate")),
            ]
        )
    head = ["source", "address", "weight", "expected", "delivered", "share", "rate", "alone"]
    lines += ["", "Per source (rate: its deliveries over its own delivery time span):"]
    lines.append(table(rows, head))
    cpu = r["cpu"]["us_per_msg"]
    parts = [f"{kind} {_us(v)}" for kind, v in cpu.items()]
    lines += [
        "",
        f"CPU per delivered message, µs: {', '.join(parts)}; "
        f"total {_us(r['cpu']['total_us_per_msg'])} ({r['workers']} workers summed)",
    ]
    if ceiling:
        c = ceiling["cpu_us_per_msg"]
        lines.append(
            f"  ceiling run: smtp-source {_us(c['smtp-source'])}, sink {_us(c['sink'])} µs/msg"
        )
    return "\n".join(lines)


def format_sweep(points: Sequence[dict[str, Any]]) -> str:
    """Return the sweep's table, one row per (sources, size), then why points failed."""
    head = ["sources", "size", "start-up", "inject", "delivered", "ceiling", "ratio", "p50", "p99"]
    rows = []
    notes = []
    for p in points:
        if "error" in p:
            rows.append([str(p["sources_n"]), f"{p['size']:,}", "FAILED"] + ["-"] * 6)
            notes.append(f"{p['sources_n']} sources, {p['size']:,} B: {p['error']}")
            continue
        ceiling = p.get("ceiling") or {}
        rows.append(
            [
                str(p["sources_n"]),
                f"{p['size']:,}",
                human_seconds(p["startup_seconds"]),
                human_rate(p["injection"]["rate"]),
                human_rate(p["rate"]),
                human_rate(ceiling.get("rate")),
                f"{p['ratio']:.2f}" if p.get("ratio") is not None else "-",
                human_seconds(p["latency"]["p50"]),
                human_seconds(p["latency"]["p99"]),
            ]
        )
    return "\n".join([table(rows, head), *(f"FAILED {n}" for n in notes)])


def write_json(result: dict[str, Any], out: Path, stem: str) -> Path:
    """Write the result as `out/stem.json`; return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def _pyplot() -> Any:
    """Return matplotlib.pyplot on a file-only backend, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: charts go to PNG files only
    import matplotlib.pyplot as plt

    return plt


_NO_CHART = "matplotlib is not installed (pip install 'kumopy[bench]'): no chart"


def chart_sources(r: dict[str, Any], path: Path) -> Path | None:
    """Chart msg/s per source and overall, ceiling drawn; return the PNG, None without matplotlib.

    A source's bar is its rate together with the others, and alone when `--each` measured it.
    """
    plt = _pyplot()
    if plt is None:
        print(_NO_CHART)
        return None
    names = [s["name"] for s in r["sources"]] + ["overall"]
    together = [s["rate"] or 0.0 for s in r["sources"]] + [r["rate"]]
    alone = [s.get("alone_rate") or 0.0 for s in r["sources"]] + [0.0]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 3), 4.5))
    xs = list(range(len(names)))
    has_alone = any(alone)
    width = 0.4 if has_alone else 0.7
    ax.bar([x - (width / 2 if has_alone else 0) for x in xs], together, width, label="together")
    if has_alone:
        ax.bar([x + width / 2 for x in xs], alone, width, label="alone (--each)")
    ceiling = r.get("ceiling")
    if ceiling:
        ax.axhline(ceiling["rate"], color="red", linestyle="--", label="smtp-source ceiling")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, ha="right")
    ax.set_ylabel("messages per second")
    ax.set_title(f"kumopy bench: {r['policy_label']}, {r['size']:,} B messages")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def chart_sweep(points: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Chart msg/s against sources (log x), ceiling drawn; return the PNG, None without matplotlib.

    One panel per message size (their rates differ tenfold), its ceiling (smtp-source) dashed.
    """
    plt = _pyplot()
    if plt is None:
        print(_NO_CHART)
        return None
    sizes = sorted({p["size"] for p in points})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.5), squeeze=False)
    ticks = sorted({p["sources_n"] for p in points})
    for ax, size in zip(axes[0], sizes, strict=True):
        ok = [p for p in points if p["size"] == size and "error" not in p]
        ax.plot([p["sources_n"] for p in ok], [p["rate"] for p in ok], marker="o", label="kumopy")
        ceilings = [p["ceiling"]["rate"] for p in ok if p.get("ceiling")]
        if ceilings:
            mean = sum(ceilings) / len(ceilings)
            ax.axhline(mean, color="red", linestyle="--", label="smtp-source ceiling")
        failed = [p["sources_n"] for p in points if p["size"] == size and "error" in p]
        for n in failed:
            ax.axvline(n, color="grey", linestyle=":", label=f"{n} sources: failed")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sources (worker processes)")
        ax.set_ylabel("messages per second, end to end")
        ax.set_title(f"{size:,} B messages")
        ax.legend()
    fig.suptitle("kumopy bench --sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
