"""Reloads that add, retire and change sources, alone and in a loop while mail flows."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kumopy.config import EgressSource
from kumopy.coordinator.reconfig import diff_sources
from kumopy.harness import Proc, wait_for
from kumopy.opscli import ControlClient
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import outcomes, send

POLICY = """
import json
import os
SINK = os.environ["TEST_SINK"]
SETUP = json.load(open(os.environ["TEST_SETUP"]))

@kumo.on("init")
def init():
    for name, (address, ehlo) in SETUP.items():
        kumo.define_egress_source(name=name, source_address=address, ehlo_domain=ehlo)
    kumo.define_egress_pool(name="p", entries=[{"name": name} for name in SETUP])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1s")
"""

A1 = ["127.0.0.2", "a1.mta.test"]
A2 = ["127.0.0.2", "a2.mta.test"]
B = ["127.0.0.3", "b.mta.test"]
C = ["127.0.0.4", "c.mta.test"]
STEPS = [
    {"a": A1, "b": B, "c": C},  # c added
    {"b": B, "c": C},  # a retired
    {"a": A2, "b": B, "c": C},  # a back, with another EHLO name
    {"a": A2, "b": B},  # c retired
    {"a": A1, "b": B},  # a changed again
]


def src(name: str, address: str, ehlo: str) -> EgressSource:
    return EgressSource(name, source_address=address, ehlo_domain=ehlo)


def test_diff_sources() -> None:
    a, b = src("a", *A1), src("b", *B)
    changes, after = diff_sources([a, b], set(), [b, src("c", *C)])
    assert (changes.added, changes.changed, changes.retired, changes.revived) == ([2], [], [0], [])
    assert [s.name for s in after] == ["a", "b", "c"]
    changes, after = diff_sources(after, {0}, [src("a", *A2), b])
    assert (changes.added, changes.changed, changes.retired, changes.revived) == ([], [0], [2], [0])
    assert after[0].ehlo_domain == "a2.mta.test"
    changes, _ = diff_sources([a, b], set(), [a, b])
    assert not changes and changes.describe([a, b]) == "no source changed"


def _reload(coord: Proc) -> None:
    with ControlClient(coord.info["control"]) as client:
        result = client.request("reload")
    assert result == {"ok": True, "errors": []}


@pytest.mark.integration
def test_reloads_add_retire_and_change_sources_while_mail_flows(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps({"a": A1, "b": B}))
    sink, records = cluster.sink()
    env = {"TEST_SINK": f"127.0.0.1:{sink.info['port']}", "TEST_SETUP": str(setup)}
    coord = cluster.coordinator(make_policy(POLICY), env=env)
    n = 1500
    sent: list[str] = []
    injector = threading.Thread(
        target=lambda: sent.extend(send(coord.info["endpoint"], n, "r", batch=25))
    )
    injector.start()
    try:
        for _ in range(3):
            for step in STEPS:
                setup.write_text(json.dumps(step))
                _reload(coord)
    finally:
        injector.join()
    setup.write_text(json.dumps({"a": A1, "b": B, "c": C}))
    _reload(coord)
    wait_for(lambda: len(records.refresh()) >= n, 60, "every message at the sink")
    recs = records.refresh()
    copies = Counter(r for rec in recs if rec["code"] == 250 for r in rec["rcpt_to"])
    assert set(copies) == set(sent) and set(copies.values()) == {1}  # each once, none lost
    kinds = outcomes(cluster, coord)
    assert all(kinds[r][-1] == "Delivery" for r in sent)
    by_ip = Counter(str(rec["peer_ip"]) for rec in recs)
    assert set(by_ip) <= {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert {str(rec["helo"]) for rec in recs if rec["peer_ip"] == "127.0.0.2"} <= {
        "a1.mta.test",
        "a2.mta.test",
    }
    status = _status(coord)
    assert {name for name, s in status["sources"].items() if not s["retired"]} == {
        "unspecified",
        "a",
        "b",
        "c",
    }
    # Every source of the last setup has a live worker again, with its last definition.
    wait_for(lambda: all(_status(coord)["workers"].values()), 30, "every worker up")


def _status(coord: Proc) -> dict[str, Any]:
    with ControlClient(coord.info["control"]) as client:
        status: dict[str, Any] = client.request("status")
    return status
