"""Policies and helpers shared by the end-to-end tests: boot a coordinator, read its outcomes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kumopy.harness import Proc, SinkRecords
from tests.conftest_procs import Cluster

__all__ = ["TWO_SOURCES", "boot", "delivered", "first_record", "outcomes"]

TWO_SOURCES = """
import os
SINK = os.environ["TEST_SINK"]
RETRY = float(os.environ.get("TEST_RETRY", "0.2"))
MAX_AGE = float(os.environ.get("TEST_MAX_AGE", "3600"))

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_pool(name="ab", entries=[{"name": "a"}, {"name": "b"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="ab", mx_list=[SINK], retry_interval=RETRY,
                                  max_retry_interval=RETRY * 4, max_age=MAX_AGE)
"""
"""Two sources (127.0.0.2 and .3) in pool `ab`, every queue sent to $TEST_SINK; the retry
interval and max age come from $TEST_RETRY and $TEST_MAX_AGE (seconds)."""


def boot(
    cluster: Cluster,
    make_policy: Callable[[str], str],
    *,
    sink_port: int | None = None,
    sink_extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    workdir: Path | None = None,
    policy: str | None = None,
) -> tuple[Proc, SinkRecords | None]:
    """Start a sink (unless given its port) and a coordinator on TWO_SOURCES (or `policy`)."""
    records = None
    if sink_port is None:
        sink, records = cluster.sink(extra=sink_extra)
        sink_port = sink.info["port"]
    coord = cluster.coordinator(
        policy or make_policy(TWO_SOURCES),
        workdir=workdir,
        extra=extra,
        env={"TEST_SINK": f"127.0.0.1:{sink_port}", **(env or {})},
    )
    return coord, records


def outcomes(cluster: Cluster, coord: Proc) -> dict[str, list[str]]:
    """Return each recipient's record types after Reception, in order."""
    out: dict[str, list[str]] = {}
    for r in cluster.records(coord):
        if r["type"] != "Reception":
            rcpt = r["recipient"]
            for one in rcpt if isinstance(rcpt, list) else [rcpt]:
                out.setdefault(one, []).append(r["type"])
    return out


def delivered(records: SinkRecords) -> Counter[str]:
    """Count the copies of each recipient the sink took with a 250."""
    return Counter(rcpt for r in records.refresh() if r["code"] == 250 for rcpt in r["rcpt_to"])


def first_record(cluster: Cluster, coord: Proc, kind: str, rcpt: str) -> dict[str, Any] | None:
    """Return the first log record of `kind` for `rcpt`, or None."""
    return next(
        (r for r in cluster.records(coord) if r["type"] == kind and r["recipient"] == rcpt), None
    )
