"""The promise under faults: nothing acknowledged is lost, nothing sent twice (real processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from kumopy.client import Client, Message
from kumopy.harness import wait_for
from kumopy.ipc.framing import decode_header, encode_header
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import (
    SLOW_RETRY,
    TWO_SOURCES,
    boot,
    delivered,
    first_record,
    outcomes,
    send,
    wait_orphans_exit,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "serial"])
@pytest.mark.parametrize("script", ["data250", "extrareply"])
def test_a_reply_out_of_step_is_a_transient_failure_never_a_delivery(
    cluster: Cluster, make_policy: MakePolicy, script: str, pipelining: bool
) -> None:
    sink_extra = () if pipelining else ("--no-pipelining",)
    coord, records = boot(cluster, make_policy, env=SLOW_RETRY, sink_extra=sink_extra)
    assert records is not None
    rcpt = f"{script}-1@dst.test"
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", rcpt, b"Subject: s\r\n\r\nbody\r\n").ok
        rec = wait_for(
            lambda: first_record(cluster, coord, "TransientFailure", rcpt), 30, "the deferral"
        )
        # The body never went: the message stays in the spool for its retry.
        assert c.request("status")["messages"] == 1
    assert outcomes(cluster, coord)[rcpt] == ["TransientFailure"]
    assert rec["response"]["code"] == 451
    assert "protocol error" in rec["response"]["content"]
    assert not delivered(records)


def test_orphaned_workers_start_nothing_once_the_coordinator_is_killed(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    # Each final reply comes 50 ms after the dot, so the sink keeps up and its clock is true.
    sink, records = cluster.sink(extra=("--slow-delay", "0.05"))
    policy = make_policy(TWO_SOURCES)
    workdir = tmp_path / "orphans"
    # Two connections per source: at most four transactions can be past DATA at any moment.
    # A large credit puts every job in the workers, which an orphan must not send.
    extra = ("--connection-limit", "2", "--credit", "1000")
    coord, _ = boot(
        cluster,
        make_policy,
        sink_port=sink.info["port"],
        workdir=workdir,
        policy=policy,
        extra=extra,
    )
    with Client(coord.info["endpoint"]) as c:
        workers = c.request("status")["workers"]
    rcpts = send(coord.info["endpoint"], 400, "slow-orphan", size=1500, batch=100)
    wait_for(lambda: len(records.refresh()) >= 8, 60, "deliveries to be under way")
    killed_at = time.time()
    os.kill(coord.pid, signal.SIGKILL)
    coord.popen.wait(10)
    wait_orphans_exit(workers.values())
    before = len(records.refresh())
    coord2, _ = boot(
        cluster,
        make_policy,
        sink_port=sink.info["port"],
        workdir=workdir,
        policy=policy,
        extra=("--connection-limit", "32"),
    )
    wait_for(lambda: set(rcpts) <= set(delivered(records)), 120, "every recipient")
    with Client(coord2.info["endpoint"]) as c:
        wait_for(lambda: c.request("status")["messages"] == 0, 30, "the spool to empty")
    copies = delivered(records)
    assert before < len(rcpts)  # the kill came mid-stream
    assert max(copies.values()) <= 2
    # Copies taken before the kill whose outcome the coordinator had not recorded yet are the
    # allowed window (the peer's 250, then the crash). A first copy taken *after* the kill
    # was sent by an orphan: only the transactions already past DATA may finish.
    first: dict[str, float] = {}
    for r in records.refresh():
        for rcpt in r["rcpt_to"]:
            first.setdefault(rcpt, r["time"])
    orphaned = sorted(r for r, n in copies.items() if n > 1 and first[r] > killed_at)
    assert len(orphaned) <= 4, f"{len(orphaned)} sent by orphans: {orphaned[:10]}"


def test_an_8bit_body_is_refused_with_5_6_3_by_a_peer_without_8bitmime(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, sink_extra=("--no-8bitmime",))
    assert records is not None
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "eight@dst.test", "Subject: é\r\n\r\nbody é\r\n".encode()).ok
        assert c.send("s@src.test", "seven@dst.test", b"Subject: e\r\n\r\nbody e\r\n").ok
    bounce = wait_for(
        lambda: first_record(cluster, coord, "Bounce", "eight@dst.test"), 30, "the bounce"
    )
    assert bounce["response"]["code"] == 554
    assert bounce["response"]["enhanced_code"] == {"class": 5, "subject": 6, "detail": 3}
    assert "8BITMIME" in bounce["response"]["content"]
    wait_for(lambda: delivered(records)["seven@dst.test"] == 1, 30, "the 7-bit message")
    assert "eight@dst.test" not in delivered(records)


def test_a_queue_whose_pool_is_gone_retries_on_its_own_schedule(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    # As after a restart with a policy that lost the pool: the queue config still gives the
    # retry schedule (0.3 s here), which applies instead of the 20-minute default.
    policy = make_policy(TWO_SOURCES.replace('egress_pool="ab"', 'egress_pool="gone"'))
    coord, _ = boot(cluster, make_policy, policy=policy, env={"TEST_RETRY": "0.3"})
    with Client(coord.info["endpoint"]) as c:
        assert c.send("s@src.test", "lost-pool@dst.test", b"Subject: p\r\n\r\nx\r\n").ok
    kinds = wait_for(
        lambda: (k := outcomes(cluster, coord).get("lost-pool@dst.test", [])) and len(k) >= 3 and k,
        30,
        "three attempts",
    )
    assert set(kinds) == {"TransientFailure"}
    recs = [r for r in cluster.records(coord) if r["type"] == "TransientFailure"]
    assert "gone" in recs[0]["response"]["content"]
    assert [r["num_attempts"] for r in recs[:3]] == [1, 2, 3]


def _raw_request(endpoint: str, frames: list[bytes]) -> dict[str, object]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no answer"
        return decode_header(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


def test_an_empty_request_gets_a_protocol_error(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, _ = boot(cluster, make_policy)
    reply = _raw_request(coord.info["endpoint"], [b""])
    assert reply["ok"] is False
    error = reply["error"]
    assert isinstance(error, dict) and error["code"] == "protocol_error"
    assert "empty request" in error["message"]


def test_a_duplicate_id_in_one_batch_is_never_acknowledged_while_the_spool_refuses(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = boot(cluster, make_policy, extra=("--min-free-space", "100000000g"))
    body = b"Subject: d\r\n\r\nx\r\n"
    with Client(coord.info["endpoint"]) as c:
        results = c.send_batch([Message("s@src.test", ["d@dst.test"], body, id="same")] * 2)
        assert [r.ok for r in results] == [False, False]
        assert all(r.transient and not r.duplicate for r in results)
        assert all(r.error is not None and r.error.code == "spool_full" for r in results)
        assert c.request("status")["messages"] == 0


def test_a_duplicate_id_from_two_clients_is_never_acknowledged_while_the_spool_refuses(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = boot(cluster, make_policy, extra=("--min-free-space", "100000000g"))
    message = {"sender": "s@src.test", "recipients": ["d@dst.test"], "data": b"x\r\n", "id": "id"}
    request = encode_header("inject", req=7, messages=[message])
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(coord.info["endpoint"])
            sock.send(encode_header("ping", req=1))
            assert sock.poll(10_000)
            sock.recv()
        # Both requests wait in the coordinator's socket while it is stopped, so that it
        # reads them in one ingress batch, as it does under load.
        coord.signal(signal.SIGSTOP)
        try:
            for sock in socks:
                sock.send(request)
        finally:
            coord.signal(signal.SIGCONT)
        replies = []
        for sock in socks:
            assert sock.poll(10_000)
            replies.append(decode_header(sock.recv()))
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
    results = [r["result"]["messages"][0] for r in replies]
    assert [r["ok"] for r in results] == [False, False], results
    assert all(r["error"]["code"] == "spool_full" and not r.get("duplicate") for r in results)
