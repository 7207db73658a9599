"""Rates, warm-up caps and holds with real processes: what the sink sees from each source."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from kumopy.client import Client
from kumopy.harness import Proc, wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import boot, outcomes, send

pytestmark = pytest.mark.integration

POLICY = """
import json
import os
SINK = os.environ["TEST_SINK"]
A_OPTS = json.loads(os.environ.get("TEST_A_OPTS", "{}"))
A_PATH = json.loads(os.environ.get("TEST_A_PATH", "{}"))
POOL = json.loads(os.environ.get("TEST_POOL", '[["a", 1], ["b", 1]]'))

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test",
                              **A_OPTS)
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": n, "weight": w} for n, w in POOL])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1h")

@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    return kumo.make_egress_path(**(A_PATH if egress_source == "a" else {}))
"""


def by_source(records: list[dict[str, object]]) -> Counter[str]:
    return Counter(str(r["peer_ip"]) for r in records if r["code"] == 250)


def test_a_source_is_held_to_its_rate_while_the_other_takes_the_rest(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    env = {"TEST_A_PATH": json.dumps({"max_message_rate": "20/s", "max_burst": 1})}
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), env=env)
    n = 400
    send(coord.info["endpoint"], n, "r")
    wait_for(lambda: len(records.refresh()) >= n, 60, "every message at the sink")
    recs = records.refresh()
    counts = by_source(recs)
    assert sum(counts.values()) == n
    times = sorted(float(str(r["time"])) for r in recs if r["peer_ip"] == "127.0.0.2")
    # a sends one at a time at 20/s: never more than the rate allows over its own span.
    assert len(times) <= 20 * (times[-1] - times[0]) + 2
    assert counts["127.0.0.3"] > counts["127.0.0.2"]
    # Nothing waited: b was always free to take what a could not.
    assert not any("Delayed" in kinds for kinds in outcomes(cluster, coord).values())


def test_warmup_caps_overflow_then_mail_waits_for_the_reset(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    now = time.time()
    warm = {"warmup": {"start": now, "daily": [0], "period": "1h"}}  # a may send none for now
    env = {"TEST_A_OPTS": json.dumps(warm), "TEST_POOL": '[["a", 3], ["b", 1]]'}
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), env=env)
    send(coord.info["endpoint"], 40, "r")
    wait_for(lambda: len(records.refresh()) >= 40, 30, "every message at the sink")
    assert by_source(records.refresh()) == {"127.0.0.3": 40}  # a's share overflowed to b
    with Client(coord.info["endpoint"]) as client:
        status = client.request("status")
    warmup = status["sources"]["a"]["warmup"]
    assert warmup["cap"] == 0 and warmup["used"] == 0 and warmup["resets_in"] > 0


def test_a_pool_whose_every_source_is_capped_waits_until_the_cap_resets(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    # Day 0 allows 3, day 1 allows 3 more, then no cap; a "day" is 2 seconds here.
    start = time.time()
    warm = {"warmup": {"start": start, "daily": [3, 3], "period": "2s"}}
    env = {"TEST_A_OPTS": json.dumps(warm), "TEST_POOL": '[["a", 1]]'}
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), env=env)
    rcpts = send(coord.info["endpoint"], 10, "w")
    wait_for(lambda: len(records.refresh()) >= 10, 30, "every message at the sink")
    times = sorted(float(str(r["time"])) for r in records.refresh())
    day = [int((t - start) // 2) for t in times]
    assert Counter(day)[0] <= 3 and Counter(day)[1] <= 3 and max(day) >= 2
    kinds = outcomes(cluster, coord)
    held = [r for r in rcpts if "Delayed" in kinds[r]]
    assert len(held) >= 7  # the ones past the first day's cap
    assert all(kinds[r].count("Delayed") <= 2 for r in rcpts)  # once per hold, not per check
    assert all(kinds[r][-1] == "Delivery" for r in rcpts)


AUTOMATION_POLICY = """
import os
SINK = os.environ["TEST_SINK"]
kumo.load_shaping(os.environ["TEST_SHAPING"])

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}, {"name": "b"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[SINK], retry_interval="1s")
"""

SHAPING = """
["default"]
connection_limit = 4

["dst.test"]
mx_rollup = false

[["dst.test".automation]]
regex = '^421 4\\.7\\.0 .*rate limited'
action = "Suspend"
trigger = "Immediate"
duration = "6s"
"""


def _holds(coord: Proc) -> list[dict[str, object]]:
    with Client(coord.info["endpoint"]) as client:
        holds: list[dict[str, object]] = client.request("status")["holds"]
    return holds


def test_a_rate_limited_source_is_suspended_for_the_site_and_it_survives_a_restart(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    sink, records = cluster.sink(extra=("--refuse-from", "127.0.0.2", "--refuse-count", "1"))
    env = {"TEST_SINK": f"127.0.0.1:{sink.info['port']}", "TEST_SHAPING": str(shaping)}
    policy = make_policy(AUTOMATION_POLICY)
    workdir = tmp_path / "coord"
    coord = cluster.coordinator(policy, workdir=workdir, env=env)
    send(coord.info["endpoint"], 10, "x")
    wait_for(lambda: len(records.refresh()) >= 10, 30, "the first ten at the sink")
    (hold,) = _holds(coord)
    assert hold["kind"] == "path" and str(hold["target"]).startswith("a>mx_list:")
    assert "rate limited" in str(hold["reason"]) and "shaping.toml" in str(hold["origin"])
    # Jobs a's other connections held already went out; the refused one went through b.
    first = by_source(records.refresh())
    assert first["127.0.0.3"] >= 1 and sum(first.values()) == 10

    coord.stop(timeout=30)
    coord = cluster.coordinator(policy, workdir=workdir, env=env)
    assert [h["target"] for h in _holds(coord)] == [hold["target"]]  # kept in the spool
    send(coord.info["endpoint"], 10, "y")
    wait_for(lambda: len(records.refresh()) >= 20, 30, "ten more at the sink")
    assert by_source(records.refresh()) - first == {"127.0.0.3": 10}  # b carries the site

    wait_for(lambda: not _holds(coord), 30, "the suspension to expire")
    send(coord.info["endpoint"], 20, "z")
    wait_for(lambda: len(records.refresh()) >= 40, 30, "twenty more at the sink")
    assert by_source(records.refresh())["127.0.0.2"] >= 5  # a has its share again
