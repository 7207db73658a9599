"""Two coordinators sharing one real redis-server: one combined rate, one daily cap, outages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumopy.client import Client
from kumopy.harness import Proc, SinkRecords, wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import send
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.integration

POLICY = """
import os
kumo.configure_redis_throttles(node=os.environ["TEST_REDIS"], prefix=os.environ["TEST_PREFIX"])
SINK = os.environ["TEST_SINK"]

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address=os.environ["TEST_ADDRESS"],
                              ehlo_domain="a.mta.test", **eval(os.environ["TEST_SOURCE"]))
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1h")

@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    return kumo.make_egress_path(**eval(os.environ["TEST_PATH"]))
"""


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def two_coordinators(
    cluster: Cluster, make_policy: MakePolicy, server: RedisServer, source: str, path: str
) -> tuple[Proc, Proc, SinkRecords]:
    sink, records = cluster.sink()
    env = {
        "TEST_REDIS": server.url,
        "TEST_PREFIX": "t" + uuid.uuid4().hex[:8],
        "TEST_SINK": f"127.0.0.1:{sink.info['port']}",
        "TEST_SOURCE": source,
        "TEST_PATH": path,
    }
    policy = make_policy(POLICY)
    one = cluster.coordinator(policy, name="one", env={**env, "TEST_ADDRESS": "127.0.0.2"})
    two = cluster.coordinator(policy, name="two", env={**env, "TEST_ADDRESS": "127.0.0.3"})
    return one, two, records


def status(coord: Proc) -> dict[str, Any]:
    with Client(coord.info["endpoint"]) as client:
        result: dict[str, Any] = client.request("status")
    return result


def test_two_coordinators_share_one_daily_cap(
    cluster: Cluster, make_policy: MakePolicy, redis_node: RedisServer
) -> None:
    warmup = '{"warmup": {"start": __import__("time").time(), "daily": [15], "period": "1h"}}'
    one, two, records = two_coordinators(cluster, make_policy, redis_node, warmup, "{}")
    send(one.info["endpoint"], 20, "one")
    send(two.info["endpoint"], 20, "two")
    wait_for(lambda: len(records.refresh()) >= 15, 30, "the day's fifteen")
    # Both hold the rest: 25 messages wait for tomorrow's cap, on the two hosts together.
    wait_for(lambda: status(one)["ready"] + status(two)["ready"] == 25, 30, "the rest to be held")
    assert len(records.refresh()) == 15
    used = [status(c)["sources"]["a"]["warmup"]["used"] for c in (one, two)]
    assert used == [15, 15]  # each shows the shared count
    assert {r["peer_ip"] for r in records.records} <= {"127.0.0.2", "127.0.0.3"}


def test_two_coordinators_hold_a_combined_rate_and_carry_on_without_redis(
    cluster: Cluster, make_policy: MakePolicy, redis_node: RedisServer
) -> None:
    path = '{"max_message_rate": "20/s", "max_burst": 2}'
    one, two, records = two_coordinators(cluster, make_policy, redis_node, "{}", path)
    send(one.info["endpoint"], 40, "one")
    send(two.info["endpoint"], 40, "two")
    wait_for(lambda: len(records.refresh()) >= 50, 60, "fifty at the sink")
    times = sorted(float(r["time"]) for r in records.refresh())
    # 20/s for the two hosts together (plus a burst of 2, leases of 0.1 s): never 40/s.
    assert len(times) <= 20 * (times[-1] - times[0]) + 10
    redis_node.kill()
    wait_for(lambda: len(records.refresh()) >= 80, 60, "the rest, under local limits")
    for coord in (one, two):
        limits = status(coord)["limits"]
        assert limits["mode"] == "redis" and limits["connected"] is False, limits
