"""Policies and helpers shared by the end-to-end tests: boot, inject, read the outcomes."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, overload

from kumopy.client import Client, Message
from kumopy.harness import Proc, SinkRecords, wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy

__all__ = [
    "ONE_SOURCE",
    "SLOW_RETRY",
    "TWO_SOURCES",
    "boot",
    "closed_port",
    "delivered",
    "first_record",
    "outcomes",
    "send",
    "wait_orphans_exit",
]

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

SLOW_RETRY = {"TEST_RETRY": "3600", "TEST_MAX_AGE": "86400"}
"""Environment for TWO_SOURCES that puts every retry an hour away: a test sees the first
attempt's outcome only, and nothing expires."""

ONE_SOURCE = """
import os
SINK = os.environ["TEST_SINK"]

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval=0.2,
                                  max_retry_interval=1, max_age=3600)
"""
"""One source `a` (127.0.0.2, EHLO a.mta.test) in pool `p`, every queue sent to $TEST_SINK,
retried after 0.2 s (at most 1 s apart) for an hour."""


@overload
def boot(
    cluster: Cluster,
    make_policy: MakePolicy,
    *,
    sink_port: None = None,
    sink_raw: bool = False,
    sink_extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    workdir: Path | None = None,
    policy: str | None = None,
) -> tuple[Proc, SinkRecords]: ...


@overload
def boot(
    cluster: Cluster,
    make_policy: MakePolicy,
    *,
    sink_port: int,
    sink_raw: bool = False,
    sink_extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    workdir: Path | None = None,
    policy: str | None = None,
) -> tuple[Proc, None]: ...


def boot(
    cluster: Cluster,
    make_policy: MakePolicy,
    *,
    sink_port: int | None = None,
    sink_raw: bool = False,
    sink_extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    workdir: Path | None = None,
    policy: str | None = None,
) -> tuple[Proc, SinkRecords | None]:
    """Start a sink (unless given its port) and a coordinator on TWO_SOURCES (or `policy`).

    Return the coordinator and a reader of the sink's records (None with `sink_port`).
    """
    records = None
    if sink_port is None:
        sink, records = cluster.sink(raw=sink_raw, extra=sink_extra)
        sink_port = sink.info["port"]
    coord = cluster.coordinator(
        policy or make_policy(TWO_SOURCES),
        workdir=workdir,
        extra=extra,
        env={"TEST_SINK": f"127.0.0.1:{sink_port}", **(env or {})},
    )
    return coord, records


def send(
    endpoint: str,
    n: int,
    prefix: str,
    *,
    tenant: str | None = None,
    size: int = 600,
    batch: int = 50,
) -> list[str]:
    """Inject n messages of about `size` bytes to {prefix}{i}@dst.test, `batch` to a request.

    Fail the test unless every one is acknowledged; return the recipients in order.
    """
    msgs = [
        Message(
            "s@src.test",
            [f"{prefix}{i}@dst.test"],
            make_body("s@src.test", "x", size, i),
            tenant=tenant,
        )
        for i in range(n)
    ]
    with Client(endpoint) as client:
        results = [
            r
            for chunk in client.send_batches([msgs[i : i + batch] for i in range(0, n, batch)])
            for r in chunk
        ]
    assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok][:3]
    return [m.recipients[0] for m in msgs]


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


def _alive(pid: int) -> bool:
    """Return True while process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_orphans_exit(pids: Iterable[int], timeout: float = 20.0) -> None:
    """Wait until each worker of a killed coordinator has exited, `timeout` seconds each."""
    for pid in pids:

        def gone(pid: int = pid) -> bool:
            return not _alive(pid)

        wait_for(gone, timeout, f"orphaned worker {pid} to exit")


def closed_port() -> int:
    """Return a loopback port that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
