"""Log records: KumoMTA's fields on every type, classification, Rejection, admin and Delayed."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kumopy.coordinator.core import Core, CoreSettings
from kumopy.coordinator.ingress import Ingress
from kumopy.coordinator.logs import LogWriter, rfc3339
from kumopy.coordinator.queues import Msg
from kumopy.coordinator.spool import SpoolStore
from kumopy.ipc.framing import decode_header, encode_header
from kumopy.ipc.inject import Limits
from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, JobResult, RecipientResult
from kumopy.logread import read_records
from kumopy.policy import load_policy

POLICY = """
from kumopy import kumo

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])
    RULES

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=["127.0.0.1:2525"], retry_interval=1,
                                  max_retry_interval=4, max_age=2.5)
"""
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
KUMOMTA_FIELDS = {
    "event_time",
    "created_time",
    "bounce_classification",
    "session_id",
    "delivery_protocol",
    "reception_protocol",
    "provider_name",
    "feedback_report",
}


class Rig:
    """A Core with a real spool and log directory, fed through the real ingress code."""

    def __init__(self, tmp: Path, rules: str = "pass") -> None:
        (tmp / "policy.py").write_text(POLICY.replace("RULES", rules))
        self.tmp = tmp
        self.spool = SpoolStore(tmp / "spool", fsync=False, min_free_bytes=0)
        self.logs = LogWriter(tmp / "log", nodeid="n1")
        self.sent: defaultdict[int, list[Job]] = defaultdict(list)
        self.core = Core(
            load_policy(tmp / "policy.py"),
            self.spool,
            self.logs,
            lambda src, jobs: self.sent[src].extend(jobs),
            CoreSettings(),
        )
        self.ingress = Ingress(self.core, Limits(), lambda request: {})
        self.src = self.core.source_index["a"]
        self.core.desk.worker_ready(self.src, 100)

    def inject(self, msgs: list[dict[str, Any]], **header: Any) -> list[dict[str, Any]]:
        """Send one inject request; return its per-message results."""
        fields = {"messages": msgs, **header}
        replies = self.ingress.handle_batch([[b"peer", encode_header("inject", req=1, **fields)]])
        reply = decode_header(replies[0][1])
        return list(reply["result"]["messages"]) if reply["ok"] else [reply]

    def jobs(self, now: float) -> list[Job]:
        """Dispatch what is due at `now`; return the jobs sent to the worker."""
        while self.core.step(now):
            pass
        jobs, self.sent[self.src] = self.sent[self.src], []
        return jobs

    def answer(self, job: Job, status: str, reply: tuple[int, str, str], now: float) -> None:
        """Report every recipient of a job with one reply, over a session of id "s1"."""
        code, enhanced, text = reply
        result = JobResult(
            job.job_id,
            [RecipientResult(r, status, code, enhanced, text, ".") for r in job.recipients],
            peer_name="mx.y.test",
            peer_addr="192.0.2.7",
            source_address="127.0.0.2",
            extra={"session_id": "s1", "tls_cipher": "TLS_AES_128_GCM_SHA256", "other": 1},
        )
        self.core.handle_results(self.src, [result], now)

    def records(self) -> list[dict[str, Any]]:
        """Return every record written so far."""
        self.logs.flush()
        return [rec for rec, _line in read_records(self.tmp / "log")]


def _msg(rcpt: str | list[str], sender: str = "s@x.test") -> dict[str, Any]:
    rcpts = rcpt if isinstance(rcpt, list) else [rcpt]
    return {"sender": sender, "recipients": rcpts, "data": b"Subject: t\r\n\r\nhi\r\n"}


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(1795792212.123456) == "2026-11-27T15:10:12.123456Z"
    assert rfc3339(1795792212.0) == "2026-11-27T15:10:12.000000Z"
    assert rfc3339(0.9999999) == "1970-01-01T00:00:00.999999Z"


def test_every_record_carries_kumomtas_fields(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert all(r["ok"] for r in rig.inject([_msg("ok@y.test"), _msg("gone@y.test")]))
    now = time.time()
    jobs = rig.jobs(now)
    assert len(jobs) == 2
    rig.answer(jobs[0], DELIVERED, (250, "2.0.0", "OK queued as 1"), now)
    rig.answer(jobs[1], PERMANENT, (550, "5.1.1", "no such user"), now + 0.25)
    recs = {(r["type"], r["recipient"]): r for r in rig.records()}
    reception = recs["Reception", "ok@y.test"]
    delivery = recs["Delivery", "ok@y.test"]
    bounce = recs["Bounce", "gone@y.test"]
    for rec in recs.values():
        assert rec.keys() >= KUMOMTA_FIELDS, rec
        assert RFC3339.fullmatch(rec["event_time"]) and RFC3339.fullmatch(rec["created_time"])
        assert isinstance(rec["timestamp"], int) and rec["reception_protocol"] == "ZMQ"
        assert rec["provider_name"] is None and rec["feedback_report"] is None
    # One request: both messages were created at once, and received then.
    assert {r["created_time"] for r in recs.values()} == {reception["created_time"]}
    assert reception["created_time"] == reception["event_time"]
    assert reception["session_id"] is None and reception["delivery_protocol"] is None
    assert reception["bounce_classification"] == "Uncategorized"
    assert abs(datetime.fromisoformat(delivery["event_time"]).timestamp() - now) < 1e-5
    assert delivery["timestamp"] == int(now)
    assert delivery["session_id"] == "s1" and delivery["delivery_protocol"] == "ESMTP"
    assert delivery["bounce_classification"] == "Uncategorized"
    assert delivery["tls_cipher"] == "TLS_AES_128_GCM_SHA256" and "other" not in delivery
    assert bounce["bounce_classification"] == "InvalidRecipient"
    assert datetime.fromisoformat(bounce["event_time"]).timestamp() == pytest.approx(now + 0.25)


def test_recipients_of_one_result_share_the_message_fields(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.inject([_msg(["a@y.test", "b@y.test", "c@y.test"])])
    now = time.time()
    (job,) = rig.jobs(now)
    result = JobResult(
        job.job_id,
        [
            RecipientResult("a@y.test", DELIVERED, 250, "2.0.0", "ok", "."),
            RecipientResult("b@y.test", TRANSIENT, 452, "4.2.2", "mailbox full", "RCPT TO"),
            RecipientResult("c@y.test", PERMANENT, 550, "5.7.1", "blocked: listed", "RCPT TO"),
        ],
        peer_addr="192.0.2.7",
        extra={"session_id": "s9"},
    )
    item = rig.core.desk.answered(job.job_id)
    assert item is not None
    rig.core.outcomes.apply(item, rig.core.sources[rig.src], result, now, provider="Yahoo")
    recs = [r for r in rig.records() if r["type"] != "Reception"]
    assert [(r["type"], r["bounce_classification"]) for r in recs] == [
        ("Delivery", "Uncategorized"),
        ("TransientFailure", "QuotaIssues"),
        ("Bounce", "SpamBlock"),
    ]
    assert {r["session_id"] for r in recs} == {"s9"}
    assert {r["provider_name"] for r in recs} == {"Yahoo"}
    assert [r["response"]["code"] for r in recs] == [250, 452, 550]


def test_expiration_counts_every_attempt(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.inject([_msg("slow@y.test")])
    t0 = time.time()
    (job,) = rig.jobs(t0)
    rig.answer(job, TRANSIENT, (451, "4.3.0", "try later"), t0)  # retried 1 s later
    (job,) = rig.jobs(t0 + 1.5)
    # The next retry would pass max_age 2.5 s: expired after its second attempt.
    rig.answer(job, TRANSIENT, (451, "4.3.0", "try later"), t0 + 1.5)
    recs = [r for r in rig.records() if r["recipient"] == "slow@y.test"]
    assert [(r["type"], r["num_attempts"]) for r in recs] == [
        ("Reception", 0),
        ("TransientFailure", 1),
        ("TransientFailure", 2),
        ("Expiration", 2),
    ]
    assert recs[-1]["bounce_classification"] == "MessageExpired"
    assert recs[-1]["delivery_protocol"] is None and recs[1]["delivery_protocol"] == "ESMTP"


def _one_msg(rig: Rig) -> Msg:
    return next(iter(rig.core.book.msgs.values()))


def test_admin_bounce_rebind_and_delayed_records(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.inject([_msg(["a@y.test", "b@y.test"])])
    msg = _one_msg(rig)
    now = time.time()
    out = rig.core.outcomes
    out.admin_bounce(msg, "purge of campaign x", now)
    out.admin_rebind(msg, msg.env.queue, "pool:warmup", "moved by operator", now)
    out.delayed(msg, "rate 10/s of source a", now)
    recs = [r for r in rig.records() if r["type"] != "Reception"]
    assert [(r["type"], r["recipient"]) for r in recs] == [
        ("AdminBounce", "a@y.test"),
        ("AdminBounce", "b@y.test"),
        ("AdminRebind", ["a@y.test", "b@y.test"]),
        ("Delayed", ["a@y.test", "b@y.test"]),
    ]
    assert recs[0]["response"]["content"] == "kumopy: administrative bounce: purge of campaign x"
    assert recs[0]["response"]["code"] == 551
    assert "to pool:warmup: moved by operator" in recs[2]["response"]["content"]
    assert recs[2]["queue"] == msg.env.queue
    assert recs[3]["response"]["code"] == 451
    assert recs[3]["bounce_classification"] == "TransientFailure"
    for rec in recs:
        assert rec.keys() >= KUMOMTA_FIELDS and rec["id"] == msg.msg_id
        assert rec["num_attempts"] == 0 and rec["delivery_protocol"] is None


def test_refused_injections_write_rejection_records(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    results = rig.inject([_msg("good@y.test"), _msg("bad@@y.test", "me@x.test"), {"sender": 7}])
    assert [r["ok"] for r in results] == [True, False, False]
    rig.inject("not a list")  # type: ignore[arg-type]  # the whole request is refused
    rig.ingress.refusing = "stopping"
    rig.inject([_msg(["late@y.test", "later@y.test"], "s@x.test")])
    recs = [r for r in rig.records() if r["type"] == "Rejection"]
    assert [(r["sender"], r["recipient"], r["response"]["code"]) for r in recs] == [
        ("me@x.test", "bad@@y.test", 550),
        (None, None, 550),
        (None, None, 554),
        ("s@x.test", ["late@y.test", "later@y.test"], 421),
    ]
    assert recs[0]["response"]["content"].startswith("kumopy: rejected: ")
    assert recs[3]["response"]["enhanced_code"] == {"class": 4, "subject": 3, "detail": 2}
    for rec in recs:
        assert rec.keys() >= KUMOMTA_FIELDS and rec["reception_protocol"] == "ZMQ"
        assert rec["id"] is None and rec["queue"] is None
        assert rec["created_time"] == rec["event_time"]
    assert rig.ingress.rejected == 4


def test_rejection_records_are_bounded_per_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(tmp_path)
    budget = rig.core.outcomes.rejections
    budget.per_second = 3
    budget.second = int(time.monotonic())  # a fresh second: no roll-over mid-test
    rig.inject([_msg(f"bad{i}@@y.test") for i in range(10)])
    assert len([r for r in rig.records() if r["type"] == "Rejection"]) == 3
    assert budget.suppressed == 7 and budget.total_suppressed == 7
    with caplog.at_level(logging.WARNING, "kumopy.coordinator.outcomes"):
        rig.core.outcomes.commit(force=True)  # the same second: nothing said yet
        assert not caplog.records
        budget.second -= 1  # as if the second had passed
        rig.core.outcomes.commit(force=True)
        rig.core.outcomes.commit(force=True)
    (warning,) = caplog.records
    assert warning.getMessage().startswith("7 Rejection records not written in one second")
    assert budget.suppressed == 0 and budget.total_suppressed == 7


def test_no_rejection_records_pile_up_while_the_log_fails(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.logs.failing = "disk full"
    rig.inject([_msg("x@y.test")])  # refused: the log cannot be written
    assert rig.logs.buffered == 0
    assert rig.core.outcomes.rejections.total_suppressed == 1


def test_a_reloaded_policy_brings_its_bounce_rules(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.inject([_msg("a@y.test"), _msg("b@y.test")])
    now = time.time()
    first, second = rig.jobs(now)
    rig.answer(first, PERMANENT, (550, "5.1.1", "unknown"), now)
    (tmp_path / "rules.toml").write_text("[rules]\n'^550 5\\.1\\.1 ' = \"InactiveMailbox\"\n")
    rules = "kumo.configure_bounce_classifier(files=['rules.toml'])"
    (tmp_path / "policy.py").write_text(POLICY.replace("RULES", rules))
    rig.core.reload(load_policy(tmp_path / "policy.py"))
    rig.answer(second, PERMANENT, (550, "5.1.1", "unknown"), now)
    classes = [r["bounce_classification"] for r in rig.records() if r["type"] == "Bounce"]
    assert classes == ["InvalidRecipient", "InactiveMailbox"]
