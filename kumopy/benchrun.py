"""One benchmark measurement: a coordinator on a policy, K injectors, deliveries into a sink."""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kumopy.benchinject import Injectors, InjectPlan
from kumopy.benchstats import (
    Samples,
    children_of,
    cpu_per_message,
    cpu_snapshot,
    log_figures,
)
from kumopy.client import Client
from kumopy.errors import KumoError
from kumopy.harness import Proc, read_log_records, start_coordinator

__all__ = ["Measure", "run_measurement"]

log = logging.getLogger(__name__)

_POLL = 0.1
"""Seconds between status polls while messages are delivered (the progress bar and the
fallback time spans); a status request costs the coordinator well under a millisecond."""


@dataclass(frozen=True, slots=True)
class Measure:
    """What one measurement runs: a policy, a sink, the load and the run's flags."""

    policy: Path
    sink: Proc
    plan: InjectPlan
    injectors: int = 2
    fsync: bool = True
    startup_timeout: float = 120.0
    """Seconds the coordinator and every worker get to say Ready."""
    timeout: float = 300.0
    """Seconds the messages get to be delivered once injection started."""
    progress: bool = True
    label: str = "delivered"
    run_args: tuple[str, ...] = ()
    """More `kumopy run` flags, e.g. --heartbeat-timeout=120 (recorded in the result)."""


def _wait_delivered(
    client: Client, injectors: Injectors, m: Measure, samples: Samples
) -> tuple[dict[str, Any], float]:
    """Poll status until every accepted message is delivered or bounced; return the last one."""
    from tqdm import tqdm

    deadline = time.monotonic() + m.timeout
    target: int | None = None  # known once every injector reported how many were accepted
    with tqdm(
        total=m.plan.count, unit="msg", disable=not m.progress, file=sys.stderr, desc=m.label
    ) as bar:
        while True:
            status = client.request("status")
            now = time.time()
            samples.add(now, status["sources"])
            records = status["records"]
            done = records.get("Delivery", 0) + records.get("Bounce", 0)
            bar.update(records.get("Delivery", 0) - bar.n)
            if target is None and all(p.poll() is not None for p in injectors.procs):
                target = sum(r["accepted"] for r in injectors.results(10.0))
                bar.total = target
            if target is not None and done >= target:
                return status, now
            if time.monotonic() > deadline:
                raise KumoError(
                    f"{done} of {target if target is not None else m.plan.count} messages "
                    f"delivered or bounced after {m.timeout:.0f}s; records so far: {records}"
                )
            time.sleep(_POLL)


def run_measurement(m: Measure, workdir: Path) -> dict[str, Any]:
    """Start a coordinator on `m.policy` routed to the sink, inject, wait, and measure it all."""
    sink = m.sink
    extra = ["--log-level", "WARNING", "--route-all-to", f"127.0.0.1:{sink.info['port']}"]
    if not m.fsync:
        extra.append("--no-fsync")
    extra += m.run_args
    workdir.mkdir(parents=True, exist_ok=True)
    injectors: Injectors | None = None
    coord: Proc | None = None
    with open(workdir / "coordinator.stderr", "wb") as err:
        try:
            t0 = time.monotonic()
            coord = start_coordinator(
                workdir, str(m.policy), extra=extra, stderr=err, timeout=m.startup_timeout
            )
            startup = time.monotonic() - t0
            endpoint = coord.info["endpoint"]
            with Client(endpoint, timeout=60) as client:
                status = client.request("status")
                workers = [p for p in status["workers"].values() if p]  # None: failed
                others = [p for p in children_of(coord.pid) if p not in workers]
                pids = {
                    "coordinator": [coord.pid],
                    "workers": workers,
                    "resolver": others,
                    "sink": [sink.pid],
                }
                injectors = Injectors(endpoint, m.plan, m.injectors)
                before = cpu_snapshot(pids)
                samples = Samples()
                go = injectors.start(60.0)
                final, done_at = _wait_delivered(client, injectors, m, samples)
                after = cpu_snapshot(pids)
                reports = injectors.results(10.0)
            coord.stop()
            pids["injectors"] = injectors.pids
        except BaseException as exc:
            if injectors is not None:
                injectors.stop()
            if coord is not None:
                coord.stop()
            _tail(workdir / "coordinator.stderr")
            why = _diagnose(workdir / "coordinator.stderr")
            if isinstance(exc, KumoError) and why:
                raise KumoError(f"{exc}; {why}") from exc
            raise
    if injectors is not None:
        injectors.stop()  # reaps them and closes their pipes
    figures = log_figures(read_log_records(workdir / "log"))
    return _assemble(
        m, startup, status, pids, go, done_at, final, samples, reports, figures, before, after
    )


def _assemble(
    m: Measure,
    startup: float,
    status: dict[str, Any],
    pids: dict[str, list[int]],
    go: float,
    done_at: float,
    final: dict[str, Any],
    samples: Samples,
    reports: list[dict[str, Any]],
    figures: dict[str, Any],
    before: dict[str, dict[int, float]],
    after: dict[str, dict[int, float]],
) -> dict[str, Any]:
    accepted = sum(r["accepted"] for r in reports)
    inj_secs = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    delivered = figures["delivered"]
    precise = figures["clock"] == "event_time"
    # End to end: from the injectors' release to the last delivery (as logged, when the log
    # has microseconds; else as the status poll saw it, to its interval).
    end = figures["last_delivery"] if precise and figures["last_delivery"] else done_at
    seconds = max(end - go, 1e-9)
    sources: dict[str, Any] = {}
    for name, f in figures["per_source"].items():
        span = f["last"] - f["first"] if precise else samples.span(name)
        sources[name] = {
            "delivered": f["delivered"],
            "span": span,
            "rate": f["delivered"] / span if span else None,
        }
    cpu = cpu_per_message(before, after, delivered, {"injectors": sum(r["cpu"] for r in reports)})
    return {
        "policy": str(m.policy),
        "count": m.plan.count,
        "size": m.plan.size,
        "injectors": len(reports),
        "fsync": m.fsync,
        "run_args": list(m.run_args),
        "startup_seconds": startup,
        "workers": len(pids["workers"]),
        "failures": status.get("failures") or {},
        "injection": {
            "accepted": accepted,
            "rejected": sum(r["rejected"] for r in reports),
            "reasons": [why for r in reports for why in r["reasons"]][:5],
            "seconds": inj_secs,
            "rate": accepted / max(inj_secs, 1e-9),
        },
        "delivered": delivered,
        "other_records": figures["other_records"],
        "seconds": seconds,
        "rate": delivered / seconds,
        "clock": figures["clock"],
        "span_from": "event_time" if precise else f"status polls every {_POLL}s",
        "latency": figures["latency"],
        "sources": sources,
        "pools": final.get("pools") or {},
        "feed": final.get("feed") or {},
        "cpu": cpu,
        "pids": pids,
    }


def _diagnose(path: Path) -> str:
    """Say what the coordinator's log shows of a failed start: workers killed while booting."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    killed = text.count("sent nothing for")
    if not killed:
        return ""
    workers = len(set(re.findall(r"worker for (\S+) sent nothing for", text)))
    return (
        f"the coordinator terminated workers {killed} times ({workers} sources) for sending "
        "nothing within --heartbeat-timeout while they were still booting"
    )


def _tail(path: Path, lines: int = 15) -> None:
    """Show the end of the coordinator's stderr: why a run failed is usually there."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if text:
        print(f"--- last lines of {path} ---", file=sys.stderr)
        print("\n".join(text), file=sys.stderr)
