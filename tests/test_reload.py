"""SIGHUP reloads sources, pools, weights and queue configs live, and refuses a broken policy."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kumopy.client import Client, Message
from kumopy.harness import wait_for
from tests.conftest_procs import Cluster, policy_file

pytestmark = pytest.mark.integration

POLICY = """
import os

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.6", ehlo_domain="a.rl.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.7", ehlo_domain="b.rl.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a", "weight": WA},
                                               {"name": "b", "weight": WB}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[os.environ["TEST_SINK"]])
"""


def _write(path: Path, wa: int, wb: int) -> str:
    return policy_file(path, POLICY.replace("WA", str(wa)).replace("WB", str(wb)))


def _burst(endpoint: str, prefix: str, n: int) -> set[str]:
    msgs = [
        Message("s@src.test", [f"{prefix}{i}@dst.test"], b"Subject: r\r\n\r\nx\r\n")
        for i in range(n)
    ]
    with Client(endpoint) as c:
        assert all(r.ok for r in c.send_batch(msgs))
    return {m.recipients[0] for m in msgs}


def _source(endpoint: str, name: str) -> dict[str, Any]:
    with Client(endpoint) as c:
        result: dict[str, Any] = c.request("status")["sources"][name]
    return result


def _reloads(endpoint: str) -> dict[str, int]:
    with Client(endpoint) as c:
        result: dict[str, int] = c.request("status")["reloads"]
    return result


def test_sighup_reloads_weights_and_refuses_a_broken_policy(
    cluster: Cluster, tmp_path: Path
) -> None:
    sink, records = cluster.sink()
    path = tmp_path / "policy.py"
    coord = cluster.coordinator(
        _write(path, 1, 2), env={"TEST_SINK": f"127.0.0.1:{sink.info['port']}"}
    )
    ep = coord.info["endpoint"]

    def split(rcpts: set[str]) -> Counter[str]:
        wait_for(lambda: rcpts <= {r["rcpt_to"][0] for r in records.refresh()}, 30, "burst")
        return Counter(r["peer_ip"] for r in records.records if r["rcpt_to"][0] in rcpts)

    assert split(_burst(ep, "one-", 30)) == {"127.0.0.6": 10, "127.0.0.7": 20}
    _write(path, 3, 1)
    coord.signal(signal.SIGHUP)
    wait_for(lambda: _reloads(ep)["ok"] == 1, 30, "the reload")
    assert split(_burst(ep, "two-", 40)) == {"127.0.0.6": 30, "127.0.0.7": 10}
    # A broken policy is refused whole; the running one keeps sending.
    path.write_text("from kumopy import kumo\nkumo.define_egress_pool(name=)\n")
    coord.signal(signal.SIGHUP)
    wait_for(lambda: _reloads(ep)["failed"] == 1, 30, "the refused reload")
    assert split(_burst(ep, "three-", 8)) == {"127.0.0.6": 6, "127.0.0.7": 2}
    # A source whose address changes gets a new worker once the old one has drained.
    policy_file(
        path, POLICY.replace("WA", "1").replace("WB", "1").replace("127.0.0.7", "127.0.0.8")
    )
    coord.signal(signal.SIGHUP)
    wait_for(lambda: _reloads(ep)["ok"] == 2, 30, "the reload changing b's address")
    wait_for(lambda: _source(ep, "b")["credit"] > 0, 30, "b's new worker")
    assert _source(ep, "b")["source_address"] == "127.0.0.8"
    assert split(_burst(ep, "four-", 8)) == {"127.0.0.6": 4, "127.0.0.8": 4}
