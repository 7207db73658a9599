"""The log of a real `kumopy run`: zstd segments read by `kumopy logs`, the PUB stream, fields."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from kumopy.client import Client, Message
from kumopy.errors import KumoError
from kumopy.harness import Proc, wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import ONE_SOURCE, boot, delivered, send, wait_orphans_exit

pytestmark = pytest.mark.integration

SUBSCRIBER = """\
import json, sys
import zmq

sub = zmq.Context().socket(zmq.SUB)
sub.connect(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5560")
sub.setsockopt(zmq.SUBSCRIBE, b"Delivery")  # b"" for every record type
while True:
    topic, body = sub.recv_multipart()
    record = json.loads(body)
    print(topic.decode(), record["recipient"], record["response"]["code"], flush=True)
"""
"""The README's subscriber, verbatim."""


def _logs(log_dir: Path, *args: str) -> list[str]:
    """Run `kumopy logs` on log_dir; return its output lines."""
    out = subprocess.run(
        [sys.executable, "-m", "kumopy", "logs", str(log_dir), *args],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return out.stdout.decode().splitlines()


def test_compressed_segments_are_read_back_by_kumopy_logs(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, extra=("--log-max-size", "4k"))
    assert records is not None
    log_dir = coord.info["log_dir"]
    rcpts = send(coord.info["endpoint"], 60, "z")
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 30, "every message at the sink")

    def logged() -> set[str]:
        return {r["recipient"] for r in cluster.records(coord) if r["type"] == "Delivery"}

    wait_for(lambda: set(rcpts) <= logged(), 30, "every Delivery record")
    # Rotated segments are compressed while kumopy runs.
    wait_for(lambda: any(n.endswith(".jsonl.zst") for n in os.listdir(log_dir)), 30, "a .zst")
    assert coord.stop() == 0
    names = os.listdir(log_dir)
    assert len(names) > 3 and all(n.endswith(".jsonl.zst") for n in names), names

    lines = _logs(log_dir, "--json", "--type", "Delivery")
    recs = [json.loads(line) for line in lines]
    assert sorted(r["recipient"] for r in recs) == sorted(rcpts)
    via_a = _logs(log_dir, "--json", "--type", "Delivery", "--source", "a")
    assert 0 < len(via_a) < 60 and all(json.loads(x)["egress_source"] == "a" for x in via_a)
    queue = recs[0]["queue"]
    in_queue = _logs(log_dir, "--json", "--queue", queue, "--type", "Reception")
    assert len(in_queue) == 60
    middle = sorted(r["event_time"] for r in recs)[30]
    since = _logs(log_dir, "--json", "--type", "Delivery", "--since", middle)
    assert len(since) == sum(r["event_time"] >= middle for r in recs)
    until = _logs(log_dir, "--json", "--type", "Delivery", "--until", middle)
    assert len(since) + len(until) == 60 + sum(r["event_time"] == middle for r in recs)
    human = _logs(log_dir, "--type", "Delivery", "--type", "Reception")
    assert len(human) == 120 and all(" -> " in line for line in human)


class _Lines:
    """Collect a child's output lines in a thread, so that the test can wait with a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line.decode().rstrip("\n"))

    def close(self) -> None:
        """Wait for the end of the output (the child exited), then close the pipe."""
        self._thread.join(10)
        self._stream.close()


def test_a_subscriber_gets_every_delivery_record(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    endpoint = f"ipc://{tmp_path}/records"
    coord, records = boot(cluster, make_policy, extra=("--log-publish", endpoint))
    assert records is not None
    script = tmp_path / "subscriber.py"
    script.write_text(SUBSCRIBER)
    sub = subprocess.Popen([sys.executable, str(script), endpoint], stdout=subprocess.PIPE)
    assert sub.stdout is not None
    out = _Lines(sub.stdout)
    try:
        # Handshake: probe messages until the subscriber prints one (it is subscribed then).
        probes = iter(range(1000))

        def subscribed() -> bool:
            send(coord.info["endpoint"], 1, f"probe{next(probes)}-")
            return _within(lambda: bool(out.lines), 2.0)

        wait_for(subscribed, 60, "the subscriber to get a probe's Delivery")
        rcpts = send(coord.info["endpoint"], 50, "pub")
        wait_for(lambda: {line.split()[1] for line in out.lines} >= set(rcpts), 30, "every record")
        got = [line.split() for line in out.lines if not line.split()[1].startswith("probe")]
        assert sorted(g[1] for g in got) == sorted(rcpts)
        assert {(g[0], g[2]) for g in got} == {("Delivery", "250")}
    finally:
        sub.kill()
        sub.wait(10)
        out.close()


def _within(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll cond until it is true or timeout passes; return whether it became true."""
    try:
        wait_for(cond, timeout, "a condition")
    except KumoError:
        return False
    return True


def test_records_carry_session_ids_per_connection_and_the_new_fields(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    extra = ("--max-deliveries-per-connection", "3", "--connection-limit", "1")
    coord, records = boot(cluster, make_policy, policy=make_policy(ONE_SOURCE), extra=extra)
    assert records is not None
    rcpts = send(coord.info["endpoint"], 12, "sess")
    bounced = "reject-1@dst.test"
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", bounced, b"Subject: b\r\n\r\nx\r\n").ok
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 30, "every message at the sink")
    by_rcpt: dict[str, dict[str, Any]] = {}

    def logged() -> bool:
        for r in cluster.records(coord):
            if r["type"] in ("Delivery", "Bounce"):
                by_rcpt[r["recipient"]] = r
        return set(rcpts) | {bounced} <= set(by_rcpt)

    wait_for(logged, 30, "every Delivery and the Bounce record")
    conn_of = {rc: r["conn"] for r in records.refresh() if r["code"] == 250 for rc in r["rcpt_to"]}
    sessions: dict[Any, set[str]] = defaultdict(set)
    for rcpt in rcpts:
        sessions[conn_of[rcpt]].add(by_rcpt[rcpt]["session_id"])
    # One session id per sink connection, a different one for each connection.
    assert all(len(ids) == 1 for ids in sessions.values())
    assert len({next(iter(ids)) for ids in sessions.values()}) == len(sessions) >= 4
    for rcpt in rcpts:
        rec = by_rcpt[rcpt]
        assert rec["delivery_protocol"] == "ESMTP" and rec["reception_protocol"] == "ZMQ"
        assert rec["bounce_classification"] == "Uncategorized"
        assert rec["provider_name"] is None and rec["feedback_report"] is None
        assert rec["created_time"] <= rec["event_time"] and rec["event_time"].endswith("Z")
    bounce = by_rcpt[bounced]
    assert bounce["type"] == "Bounce" and bounce["bounce_classification"] == "InvalidRecipient"
    assert bounce["session_id"] and bounce["delivery_protocol"] == "ESMTP"


def test_refused_injections_are_rejection_records(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _records = boot(cluster, make_policy)
    msgs = [
        Message("s@src.test", ["fine@dst.test"], b"Subject: ok\r\n\r\nx\r\n"),
        Message("s@src.test", ["two@@dst.test"], b"Subject: bad\r\n\r\nx\r\n"),
        Message("s@src.test", ["longline@dst.test"], b"x" * 1200 + b"\r\n"),
    ]
    with Client(coord.info["endpoint"]) as c:
        results = c.send_batch(msgs)
    assert [r.ok for r in results] == [True, False, False]

    def rejections() -> list[dict[str, Any]]:
        return [r for r in cluster.records(coord) if r["type"] == "Rejection"]

    recs = wait_for(lambda: len(rejections()) == 2 and rejections(), 30, "two Rejection records")
    assert [(r["sender"], r["recipient"]) for r in recs] == [
        ("s@src.test", "two@@dst.test"),
        ("s@src.test", "longline@dst.test"),
    ]
    assert {r["response"]["code"] for r in recs} == {550}
    assert all(r["reception_protocol"] == "ZMQ" and r["session_id"] is None for r in recs)


def _status(coord: Proc) -> dict[str, Any]:
    with Client(coord.info["endpoint"]) as c:
        result: dict[str, Any] = c.request("status")
        return result


def test_a_plain_segment_left_by_a_crash_is_compressed_at_the_next_start(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    coord, records = boot(cluster, make_policy, workdir=workdir)
    assert records is not None
    rcpts = send(coord.info["endpoint"], 5, "crash")
    wait_for(
        lambda: (
            set(rcpts)
            <= {r["recipient"] for r in cluster.records(coord) if r["type"] == "Delivery"}
        ),
        30,
        "the Delivery records",
    )
    workers = list(_status(coord)["workers"].values())
    coord.signal(signal.SIGKILL)
    coord.popen.wait(10)
    wait_orphans_exit(workers)
    log_dir = workdir / "log"
    (left,) = os.listdir(log_dir)
    assert left.endswith(".jsonl")
    port = int(records.path.parent.joinpath("sink.port").read_text())
    again, _ = boot(cluster, make_policy, sink_port=port, workdir=workdir)

    def compressed() -> bool:
        names = os.listdir(log_dir)
        return left + ".zst" in names and left not in names

    wait_for(compressed, 30, "the crash's segment to be compressed")
    current = [n for n in os.listdir(log_dir) if n.endswith(".jsonl")]
    assert len(current) == 1 and current[0] != left  # the running one is never compressed
    delivered_again = {r["recipient"] for r in cluster.records(again) if r["type"] == "Delivery"}
    assert set(rcpts) <= delivered_again
