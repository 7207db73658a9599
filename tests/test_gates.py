"""Rates and warm-up caps at pick time, in the queueing core alone (no processes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kumopy.coordinator.limits import Limiter
from kumopy.rates import parse_rate
from tests.test_core import Harness

HEAD = """
from kumopy import kumo

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2"{a_opts})
    kumo.define_egress_source(name="b", source_address="127.0.0.3")
    kumo.define_egress_source(name="c", source_address="127.0.0.4")
    kumo.define_egress_pool(name="p", entries=[{{"name": "a", "weight": 1}},
                                               {{"name": "b", "weight": 1}},
                                               {{"name": "c", "weight": 2}}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=["127.0.0.1:2525"]{q_opts})
"""
PATH = """
@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    if egress_source == "a":
        return kumo.make_egress_path({path_opts})
    return kumo.make_egress_path()
"""


def harness(tmp: Path, a_opts: str = "", q_opts: str = "", path_opts: str | None = None) -> Harness:
    text = HEAD.format(a_opts=a_opts, q_opts=q_opts)
    if path_opts is not None:
        text += PATH.format(path_opts=path_opts)
    h = Harness(tmp, text, max_ready=10_000)
    for src in range(len(h.core.sources)):
        h.core.desk.worker_ready(src, 10_000)
    return h


def picked(h: Harness) -> Counter[str]:
    counts = h.core.dispatcher.picks["p"]
    return Counter({h.core.sources[i].name: n for i, n in enumerate(counts) if n})


def test_a_rate_limited_source_overflows_to_the_others_by_weight(tmp_path: Path) -> None:
    h = harness(tmp_path, path_opts='max_message_rate="10/s"')
    h.inject(400)
    h.core.step(1000.0)
    counts = picked(h)
    # a takes its burst of 10; b and c share the other 390 one to two.
    assert counts == {"a": 10, "b": 130, "c": 260}
    assert h.core.gates.refusals["rate"] > 0


def test_warmup_cap_overflows_then_everyone_waits_until_it_resets(tmp_path: Path) -> None:
    warm = ', warmup={"start": 1000, "daily": [5, 20], "period": 100}'
    h = harness(tmp_path, a_opts=warm)
    h.inject(100)
    h.core.step(1010.0)
    assert picked(h) == {"a": 5, "b": 32, "c": 63}  # a's cap, then 1:2 among the rest
    status = h.core.status(now=1010.0)["sources"]["a"]["warmup"]
    assert (status["day"], status["cap"], status["used"], status["resets_at"]) == (0, 5, 5, 1100)


def test_a_message_waits_only_when_every_source_is_held(tmp_path: Path) -> None:
    h = harness(tmp_path, q_opts=', max_message_rate="4/10s"')
    h.inject(10)
    h.core.step(1000.0)
    assert sum(picked(h).values()) == 4  # the queue's own rate, whatever the sources
    assert h.core.dispatcher.next_wake() == pytest.approx(1002.5)
    status = h.core.status(now=1000.0)
    assert status["ready"] == 6 and status["limits"]["held_queues"] == 1
    h.core.step(1001.0)
    assert sum(picked(h).values()) == 4  # not yet: no busy waiting, nothing moves
    h.core.step(1002.5)
    assert sum(picked(h).values()) == 5
    h.core.step(1010.0)
    assert sum(picked(h).values()) == 8


def test_path_selection_rate_and_source_rate_combine(tmp_path: Path) -> None:
    h = harness(
        tmp_path,
        a_opts=', source_selection_rate="3/min"',
        path_opts='source_selection_rate="2/min"',
    )
    h.inject(60)
    h.core.step(0.0)
    assert picked(h)["a"] == 2  # the tighter of the two; the looser one gave its token back
    assert h.core.limiter.rate("select:a", parse_rate("3/min"), 0.0) == 0.0  # 1 of 3 left
    assert h.core.limiter.rate("select:a", parse_rate("3/min"), 0.0) > 0.0


def test_limiter_gives_back_what_a_refused_pick_took() -> None:
    limiter = Limiter()
    rate = parse_rate("1/s")
    assert limiter.rate("k", rate, 0.0) == 0.0
    limiter.give_back("k", rate)
    assert limiter.rate("k", rate, 0.0) == 0.0 and limiter.rate("k", rate, 0.0) > 0
