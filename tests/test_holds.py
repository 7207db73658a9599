"""Holds (suspensions and overrides) and the automation engine, in the queueing core alone."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kumopy.coordinator.holds import Hold
from kumopy.ipc.jobs import TRANSIENT, JobResult, RecipientResult
from tests.test_gates import harness, picked


def test_a_held_source_leaves_selection_and_comes_back(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.core.holds.add(Hold("source", "a", float("inf"), "blocklisted at a provider"))
    h.inject(40)
    h.core.step(1000.0)
    assert picked(h) == {"b": 13, "c": 27}
    assert "a" in {h.core.sources[i].name for i in h.core.desk.held}
    ended = h.core.holds.remove(lambda x: x.kind == "source", "resumed by test")
    assert [x.target for x in ended] == ["a"]
    h.inject(40, "z.test")
    h.core.step(1001.0)
    assert picked(h)["a"] == 10  # back at its weight


def test_a_path_hold_sends_the_site_through_the_others(tmp_path: Path) -> None:
    h = harness(tmp_path)
    site = "mx_list:127.0.0.1:2525"
    h.core.holds.add(Hold("path", f"a>{site}", 2000.0, "421 4.7.0 rate limited", "automation"))
    h.inject(40)
    h.core.step(1000.0)
    assert "a" not in picked(h) and sum(picked(h).values()) == 40
    h.core.tick(2000.0)  # the hold expires by itself
    assert h.core.holds.holds == {}
    h.inject(40, "z.test")
    h.core.step(2000.0)
    assert picked(h)["a"] == 10


def test_a_held_tenant_waits_with_one_delayed_record_each(tmp_path: Path) -> None:
    h = harness(tmp_path)
    written: list[dict[str, Any]] = []
    h.core.logs.write = written.append  # type: ignore[method-assign,assignment]
    h.core.holds.add(Hold("tenant", "acme", float("inf"), "bounces too much"))
    ingress = h.ingress
    from kumopy.ipc.framing import encode_header

    msgs = [
        {
            "sender": "s@x.test",
            "recipients": [f"r{i}@y.test"],
            "data": b"hi\r\n",
            "meta": {"tenant": "acme"},
        }
        for i in range(5)
    ]
    ingress.handle_batch([[b"peer", encode_header("inject", req=1, messages=msgs)]])
    h.inject(3)  # no tenant: not held
    for t in (1000.0, 1001.0, 1002.0):
        h.core.step(t)
    assert sum(picked(h).values()) == 3
    delayed = [r for r in written if r["type"] == "Delayed"]
    assert len(delayed) == 5  # once per message per hold, not once per check
    assert "bounces too much" in str(delayed[0]["response"])
    h.core.holds.remove(lambda x: x.kind == "tenant", "resumed")
    h.core.step(1003.0)
    assert sum(picked(h).values()) == 8


def test_holds_survive_a_restart(tmp_path: Path) -> None:
    h = harness(tmp_path)
    later = time.time() + 3600
    h.core.holds.add(Hold("source", "b", later, "maintenance"))
    h.core.holds.add(
        Hold("config", "a>site", later, "slow down", option="connection_limit", value=2)
    )
    h.core.holds.add(Hold("queue", "gone.test", time.time() - 1, "already over"))
    h.spool.close()
    again = harness(tmp_path)
    assert set(again.core.holds.holds) == {"source:b", "config:a>site#connection_limit"}
    assert again.core.holds.overrides("a", "site", None) == {"connection_limit": 2}
    assert again.core.status()["sources"]["b"]["suspended"].startswith("suspended: source b")


@dataclass(frozen=True)
class FakeRule:
    scope_kind: str = "site"
    scope: str = "mx_list:127.0.0.1:2525"
    regexes: tuple[re.Pattern[str], ...] = (re.compile(r"^421 4\.7\.0"),)
    action: str = "Suspend"
    config: tuple[str, object] | None = None
    trigger_count: int = 1
    trigger_window: float = 0.0
    duration: float = 60.0
    where: str = "shaping.toml:12"
    match_internal: bool = False


@pytest.mark.parametrize("threshold", [False, True])
def test_automation_suspends_the_path_that_saw_the_reply(tmp_path: Path, threshold: bool) -> None:
    h = harness(tmp_path)
    rule = FakeRule(trigger_count=3, trigger_window=600.0) if threshold else FakeRule()
    h.core.automation.reload(lambda site, domain, provider: [rule])
    h.inject(30)
    h.core.step(1000.0)
    jobs = h.sent[h.core.source_index["a"]]
    for n, job in enumerate(jobs[:3]):
        reply = RecipientResult(job.recipients[0], TRANSIENT, 421, "4.7.0", "rate limited", "MAIL")
        h.core.handle_results(h.core.source_index["a"], [JobResult(job.job_id, [reply])], 1000.0)
        held = "path:a>mx_list:127.0.0.1:2525" in h.core.holds.holds
        assert held == (not threshold or n == 2)
    hold = h.core.holds.holds["path:a>mx_list:127.0.0.1:2525"]
    assert hold.until == 1060.0 and hold.origin == "automation shaping.toml:12"
    assert "421 4.7.0 rate limited" in hold.reason
    before = Counter(picked(h))
    h.inject(40, "z.test")
    h.core.step(1001.0)
    after = Counter(picked(h)) - before
    assert "a" not in after and sum(after.values()) == 40
