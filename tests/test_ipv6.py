"""End to end over IPv6: sources bound to IPv6 addresses inside a network namespace of our own."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kumopy.client import Client
from kumopy.harness import (
    Proc,
    SinkRecords,
    read_log_records,
    start_coordinator,
    start_sink,
    wait_for,
)
from tests.conftest_procs import policy_file
from tests.policies import send

pytestmark = pytest.mark.integration

V6_A = "fd00:6b75::2"
V6_B = "fd00:6b75::3"
V4 = "127.0.0.2"
EHLO = {V6_A: "a6.mta.test", V6_B: "b6.mta.test", V4: "v4.mta.test"}
SOURCE_IP = {"a6": V6_A, "b6": V6_B, "v4": V4}

POLICY = """
import os
SINK = os.environ["TEST_SINK"]

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a6", source_address="fd00:6b75::2", ehlo_domain="a6.mta.test")
    kumo.define_egress_source(name="b6", source_address="fd00:6b75::3", ehlo_domain="b6.mta.test")
    kumo.define_egress_source(name="v4", source_address="127.0.0.2", ehlo_domain="v4.mta.test")
    kumo.define_egress_pool(name="six", entries=[{"name": "a6", "weight": 1},
                                                 {"name": "b6", "weight": 3}])
    kumo.define_egress_pool(name="four", entries=[{"name": "v4"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    # A long retry interval keeps the IPv4 message's single failure the only one in the log.
    return kumo.make_queue_config(egress_pool=tenant, mx_list=[SINK], retry_interval="1h")
"""


def _ip(ns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def namespace(*addresses: str) -> Iterator[str]:
    """Create a namespace with lo up and `addresses` on it; always delete it after."""
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    name = f"kumopy-t-{secrets.token_hex(4)}"
    added = _ip(None, "netns", "add", name)
    if added.returncode != 0:
        pytest.skip(f"ip netns add failed: {added.stderr.strip()}")
    try:
        done = _ip(name, "link", "set", "lo", "up")
        assert done.returncode == 0, done.stderr
        for addr in addresses:
            done = _ip(name, "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            assert done.returncode == 0, (addr, done.stderr)
        yield name
    finally:
        _ip(None, "netns", "del", name)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A namespace with lo up and the two IPv6 source addresses on it."""
    with namespace(V6_A, V6_B) as name:
        yield name


@dataclass
class Net:
    """The processes running inside the namespace, and how to reach them."""

    endpoint: str
    sink: Proc
    records: SinkRecords
    coord: Proc

    def log(self) -> list[dict[str, Any]]:
        """Return every log record the coordinator wrote so far."""
        return read_log_records(self.coord.info["log_dir"])


@contextlib.contextmanager
def running(ns: str, tmp: Path, policy: str, extra: tuple[str, ...] = ()) -> Iterator[Net]:
    """Run a sink on [::1] and a coordinator inside namespace `ns`; stop both by PID."""
    prefix = ["ip", "netns", "exec", ns]
    procs: list[Proc] = []
    try:
        sink = start_sink(tmp / "sink", host="::1", prefix=prefix)
        procs.append(sink)
        coord = start_coordinator(
            tmp / "coord",
            policy_file(tmp / "policy.py", policy),
            extra=["--log-level", "INFO", *extra],
            env={"TEST_SINK": f"[::1]:{sink.info['port']}"},
            prefix=prefix,
            # A unix socket is a file: reachable from this namespace, unlike the other's loopback.
            listen=f"ipc://{tmp}/ingress",
        )
        procs.append(coord)
        yield Net(coord.info["endpoint"], sink, SinkRecords(sink.info["record"]), coord)
    finally:
        # Coordinator first (it stops its workers), and everything before the namespace goes.
        for proc in reversed(procs):
            proc.stop(timeout=30)


@pytest.fixture(scope="module")
def net(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """The processes of the module's namespace."""
    with running(netns, tmp_path_factory.mktemp("ipv6"), POLICY) as n:
        yield n


def test_ipv6_pool_sends_from_both_addresses_by_weight(net: Net) -> None:
    assert net.endpoint.startswith("ipc://")
    rcpts = set(send(net.endpoint, 40, "six-", tenant="six", size=300))

    def mine() -> list[dict[str, Any]]:
        return [r for r in net.records.refresh() if r["rcpt_to"][0] in rcpts]

    recs = wait_for(lambda: len(mine()) >= 40 and mine(), 30, "40 messages at the sink")
    assert len(recs) == 40
    assert Counter(r["peer_ip"] for r in recs) == {V6_A: 10, V6_B: 30}
    for r in recs:
        assert r["helo"] == EHLO[r["peer_ip"]], r
        assert r["code"] == 250, r

    def deliveries() -> list[dict[str, Any]]:
        return [r for r in net.log() if r["type"] == "Delivery" and r["recipient"] in rcpts]

    got = wait_for(lambda: len(deliveries()) >= 40 and deliveries(), 30, "40 Delivery records")
    assert len(got) == 40
    assert Counter(d["egress_source"] for d in got) == {"a6": 10, "b6": 30}
    for d in got:
        assert d["egress_pool"] == "six"
        assert d["source_address"]["address"] == SOURCE_IP[d["egress_source"]], d
        assert d["peer_address"]["addr"] == "::1", d
        assert d["response"]["code"] == 250, d


def test_ipv4_source_does_not_try_an_ipv6_only_host(net: Net) -> None:
    (rcpt,) = send(net.endpoint, 1, "four-", tenant="four", size=300)

    def failures() -> list[dict[str, Any]]:
        return [r for r in net.log() if r["recipient"] == rcpt and r["type"] != "Reception"]

    recs = wait_for(failures, 30, "the IPv4 message's outcome")
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec["type"] == "TransientFailure", rec
    # No source of the pool has a route: the coordinator says so without trying any.
    assert rec["egress_source"] is None and rec["response"]["code"] == 451, rec
    content = rec["response"]["content"]
    assert "v4 (ipv4) has no ipv4 route" in content and "::1 (ipv6)" in content, content
    # The sink took nothing from the IPv4 address, for this message or any other.
    net.records.refresh()
    assert not [r for r in net.records.records if rcpt in r["rcpt_to"] or r["peer_ip"] == V4]
    with Client(net.endpoint) as client:
        status = client.request("status")
    assert status["messages"] >= 1  # kept for a retry, not bounced


UNPLUMB_POLICY = """
import os

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a6", source_address="fd00:6b75::2", ehlo_domain="a6.mta.test")
    kumo.define_egress_source(name="b6", source_address="fd00:6b75::3", ehlo_domain="b6.mta.test")
    kumo.define_egress_pool(name="six", entries=[{"name": "a6"}, {"name": "b6"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="six", mx_list=[os.environ["TEST_SINK"]],
                                  retry_interval="0.3s", max_retry_interval="0.3s")
"""


def test_a_source_whose_address_disappears_is_suspended_and_the_pool_carries_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("unplumb")
    with (
        namespace(V6_A, V6_B) as ns,
        running(ns, tmp, UNPLUMB_POLICY, ("--suspend-unplumbed", "600")) as n,
    ):
        # The address goes away after the workers started (their boot check passed).
        gone = _ip(ns, "-6", "addr", "del", f"{V6_B}/128", "dev", "lo")
        assert gone.returncode == 0, gone.stderr
        rcpts = set(send(n.endpoint, 20, "u-", tenant="six", size=300))
        wait_for(
            lambda: rcpts <= {r["rcpt_to"][0] for r in n.records.refresh()},
            30,
            "all 20 messages, through the source still plumbed",
        )
        assert {r["peer_ip"] for r in n.records.records} == {V6_A}
        with Client(n.endpoint) as client:
            st = client.request("status")
        assert "cannot bind source address fd00:6b75::3" in st["sources"]["b6"]["suspended"]
        assert st["sources"]["a6"]["suspended"] is None
        failed = [r for r in n.log() if r["type"] == "TransientFailure"]
        assert failed and all(r["egress_source"] == "b6" for r in failed)
        assert "cannot bind" in failed[0]["response"]["content"]
        delivered = [r for r in n.log() if r["type"] == "Delivery"]
        assert {d["egress_source"] for d in delivered} == {"a6"}
