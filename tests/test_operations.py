"""Operator verbs with real processes: suspend, resume, bounce, rebind, queues, the channel."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kumopy.client import Client, Message
from kumopy.harness import Proc, SinkRecords, wait_for
from kumopy.inject import make_body
from kumopy.opscli import ControlClient
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import outcomes, send

pytestmark = pytest.mark.integration

POLICY = """
import os
SINK = os.environ["TEST_SINK"]

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_source(name="c", source_address="127.0.0.4", ehlo_domain="c.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}, {"name": "b"}])
    kumo.define_egress_pool(name="q", entries=[{"name": "c"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1s")
"""


def start(cluster: Cluster, make_policy: MakePolicy) -> tuple[Proc, SinkRecords]:
    sink, records = cluster.sink()
    coord = cluster.coordinator(
        make_policy(POLICY), env={"TEST_SINK": f"127.0.0.1:{sink.info['port']}"}
    )
    return coord, records


def kumopy(coord: Proc, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a `kumopy` verb against the coordinator's control channel."""
    cmd = [sys.executable, "-m", "kumopy", *args, "--control", coord.info["control"]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, input=stdin)


def control(coord: Proc, kind: str, **fields: Any) -> Any:
    with ControlClient(coord.info["control"]) as client:
        return client.request(kind, **fields)


def by_ip(records: SinkRecords, since: int = 0) -> Counter[str]:
    return Counter(str(r["peer_ip"]) for r in records.refresh()[since:] if r["code"] == 250)


def inject(coord: Proc, n: int, prefix: str, **kw: Any) -> list[str]:
    msgs = [
        Message("s@src.test", [f"{prefix}{i}@dst.test"], make_body("s@src.test", "x", 300, i), **kw)
        for i in range(n)
    ]
    with Client(coord.info["endpoint"]) as client:
        assert all(r.ok for r in client.send_batch(msgs))
    return [m.recipients[0] for m in msgs]


def test_suspend_and_resume_a_source_while_mail_flows(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = start(cluster, make_policy)
    send(coord.info["endpoint"], 40, "one")
    wait_for(lambda: len(records.refresh()) >= 40, 30, "the first batch")
    assert by_ip(records).keys() == {"127.0.0.2", "127.0.0.3"}
    done = kumopy(coord, "suspend", "--source", "a", "--duration", "1h", "--reason", "blocked")
    assert done.returncode == 0, done.stderr
    assert "suspended: source a until" in done.stdout and "blocked" in done.stdout
    send(coord.info["endpoint"], 40, "two")
    wait_for(lambda: len(records.refresh()) >= 80, 30, "the second batch")
    assert by_ip(records, 40) == {"127.0.0.3": 40}  # none from a while suspended
    table = kumopy(coord, "queues")
    assert table.returncode == 0 and "HELD suspended: source a" in table.stdout, table.stdout
    assert "source -> site" in table.stdout and "dst.test" in table.stdout
    done = kumopy(coord, "resume", "--source", "a")
    assert done.returncode == 0 and "resumed: source a" in done.stdout, done.stderr
    send(coord.info["endpoint"], 40, "three")
    wait_for(lambda: len(records.refresh()) >= 120, 30, "the third batch")
    assert by_ip(records, 80)["127.0.0.2"] >= 10


def test_suspend_a_tenant_holds_only_its_mail(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, records = start(cluster, make_policy)
    control(coord, "suspend", tenant="acme", reason="complaints")
    held = inject(coord, 10, "acme", tenant="acme")
    free = inject(coord, 10, "other")
    wait_for(lambda: len(records.refresh()) >= 10, 30, "the other tenant's mail")
    got = {r for rec in records.refresh() for r in rec["rcpt_to"]}
    assert got == set(free)
    wait_for(
        lambda: all("Delayed" in outcomes(cluster, coord).get(r, []) for r in held),
        30,
        "a Delayed record for each held message",
    )
    assert control(coord, "resume", tenant="acme")["count"] == 1
    wait_for(lambda: len(records.refresh()) >= 20, 30, "acme's mail after the resume")
    kinds = outcomes(cluster, coord)
    assert all(kinds[r].count("Delayed") == 1 and kinds[r][-1] == "Delivery" for r in held)


def test_bounce_a_campaign(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, records = start(cluster, make_policy)
    control(coord, "suspend", campaign="spring", reason="hold it while we decide")
    doomed = inject(coord, 20, "spring", campaign="spring")
    kept = inject(coord, 5, "keep")
    wait_for(lambda: len(records.refresh()) >= 5, 30, "the other mail")
    refused = kumopy(coord, "bounce", "--campaign", "spring", "--reason", "bad list", stdin="n\n")
    assert refused.returncode == 1 and "bounce 20 messages" in refused.stdout
    done = kumopy(coord, "bounce", "--campaign", "spring", "--reason", "bad list", "--yes")
    assert done.returncode == 0 and "bounced 20" in done.stdout, done.stderr
    kinds = outcomes(cluster, coord)
    assert all(kinds[r][-1] == "AdminBounce" for r in doomed)
    assert {r for rec in records.refresh() for r in rec["rcpt_to"]} == set(kept)
    assert control(coord, "status")["messages"] == 0  # nothing left in the spool for it


def test_rebind_a_queue_to_another_pool(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, records = start(cluster, make_policy)
    control(coord, "suspend", queue="dst.test", reason="moving it")
    moved = inject(coord, 15, "mv")
    done = kumopy(coord, "rebind", "--queue", "dst.test", "--pool", "q", "--reason", "to c")
    assert done.returncode == 0 and "rebound 15 messages to pool q" in done.stdout, done.stderr
    wait_for(lambda: len(records.refresh()) >= 15, 30, "the rebound mail")
    assert by_ip(records) == {"127.0.0.4": 15}  # the new pool's address
    kinds = outcomes(cluster, coord)
    assert all(kinds[r] == ["Delayed", "AdminRebind", "Delivery"] for r in moved), kinds[moved[0]]
    bad = kumopy(coord, "rebind", "--queue", "dst.test", "--pool", "nope")
    assert bad.returncode == 1 and "unknown pool 'nope'" in bad.stderr


def test_the_control_channel_answers_while_injection_is_flooded(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = start(cluster, make_policy)
    stop = threading.Event()

    def flood() -> None:
        with Client(coord.info["endpoint"], timeout=120) as client:
            i = 0
            while not stop.is_set():
                msgs = [
                    Message("s@src.test", [f"f{i}-{j}@dst.test"], b"Subject: x\r\n\r\nx\r\n")
                    for j in range(500)
                ]
                list(client.send_batches([msgs] * 4, window=4))
                i += 1

    floods = [threading.Thread(target=flood) for _ in range(3)]
    for t in floods:
        t.start()
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert control(coord, "ping") == {"pong": True}
            worst = max(worst, time.monotonic() - t0)
            control(coord, "queues", limit=5)
    finally:
        stop.set()
        for t in floods:
            t.join()
    assert worst < 2.0, f"a ping took {worst:.2f}s during the flood"


def test_bad_control_requests_get_clear_errors(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, _ = start(cluster, make_policy)
    for fields, text in (
        ({"source": "zz"}, "unknown source 'zz'"),
        ({"source": "a", "pool": "p"}, "name exactly one of"),
        ({"source": "a", "duration": "soon"}, "duration:"),
        ({}, "name exactly one of"),
    ):
        with pytest.raises(Exception, match=text):
            control(coord, "suspend", **fields)
    with pytest.raises(Exception, match="unknown control request kind"):
        control(coord, "fly")
    assert control(coord, "ping") == {"pong": True}  # still answering


def test_control_socket_is_private(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, _ = start(cluster, make_policy)
    path = Path(coord.info["control"].removeprefix("ipc://"))
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600


def test_metrics_follow_suspensions_and_count_by_provider(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    sink, records = cluster.sink()
    coord = cluster.coordinator(
        make_policy(POLICY),
        env={"TEST_SINK": f"127.0.0.1:{sink.info['port']}"},
        extra=("--metrics", "127.0.0.1:0"),
    )
    send(coord.info["endpoint"], 10, "m")
    records.wait_count(10, 30)
    port = control(coord, "status")["metrics_port"]
    control(coord, "suspend", source="a", reason="metrics test")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape() -> str | None:
        text: str = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return text if 'kumopy_source_up{address="127.0.0.2",source="a"} 0.0' in text else None

    text = wait_for(scrape, 30, "kumopy_source_up to follow the suspension")
    assert 'kumopy_source_up{address="127.0.0.3",source="b"} 1.0' in text
    delivered = [
        line
        for line in text.splitlines()
        if line.startswith("total_messages_delivered_by_provider_and_source{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in delivered) == 10
    assert 'kumopy_holds{kind="source"} 1.0' in text
    assert 'ready_count{queue="' not in text or "@smtp_client" in text
