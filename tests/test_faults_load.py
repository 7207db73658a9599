"""Requests that would exhaust the coordinator: huge fan-outs, many queues, giant bodies."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from kumopy.client import Client, Message
from kumopy.harness import wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import SLOW_RETRY, boot, closed_port, delivered

pytestmark = pytest.mark.integration


def _rss(pid: int) -> int:
    """Return a process's resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_giant_fan_out_is_refused_with_a_clear_error_and_workers_stay_up(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = boot(cluster, make_policy, extra=("--heartbeat-timeout", "3"))
    with Client(coord.info["endpoint"], timeout=60) as c:
        workers = c.request("status")["workers"]
        rcpts = [[f"r{i}@d{m}-{i}.test" for i in range(1000)] for m in range(400)]
        results = c.send_batch(
            [Message("s@src.test", r, b"Subject: f\r\n\r\nx\r\n") for r in rcpts]
        )
        assert not any(r.ok for r in results)
        error = results[0].error
        assert error is not None and error.code == "protocol_error"
        assert "400000 spooled messages" in str(error) and "10000" in str(error)
        st = c.request("status")
        assert st["messages"] == 0 and st["queue_count"] == 0
        # At the limit, it is taken; the loop keeps serving heartbeats meanwhile.
        at_limit = [[f"r{i}@e{m}-{i}.test" for i in range(100)] for m in range(100)]
        results = c.send_batch(
            [Message("s@src.test", r, b"Subject: f\r\n\r\nx\r\n") for r in at_limit]
        )
        assert all(r.ok for r in results)
        assert c.request("status")["workers"] == workers  # nobody was killed as hung


def test_empty_queues_are_dropped_and_status_lists_only_the_largest(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    # Nothing reachable: 300 queues keep their messages, and status stays small.
    coord, _ = boot(
        cluster,
        make_policy,
        sink_port=closed_port(),
        env=SLOW_RETRY,
        workdir=tmp_path / "held",
    )
    with Client(coord.info["endpoint"]) as c:
        msgs = [
            Message("s@src.test", [f"r@q{i}.test"], b"x\r\n", campaign=f"c{i}") for i in range(300)
        ]
        assert all(r.ok for r in c.send_batch(msgs))
        st = c.request("status")
        assert st["queue_count"] == 300 and len(st["queues"]) == 50
        page = c.request("status", queues_limit=10, queues_offset=295)
        assert len(page["queues"]) == 5
    coord.stop()
    # Delivered: the emptied queues are forgotten once idle.
    live, records = boot(cluster, make_policy, extra=("--queue-idle-timeout", "0.5"))
    assert records is not None
    with Client(live.info["endpoint"]) as c:
        msgs = [
            Message("s@src.test", [f"r@q{i}.test"], b"x\r\n", campaign=f"c{i}") for i in range(300)
        ]
        assert all(r.ok for r in c.send_batch(msgs))
        wait_for(lambda: len(delivered(records)) == 300, 60, "every message")
        wait_for(lambda: c.request("status")["queue_count"] == 0, 30, "idle queues to go")


def test_refused_giant_bodies_are_freed_at_once(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, _ = boot(cluster, make_policy)
    with Client(coord.info["endpoint"], timeout=120) as c:
        c.request("ping")
        before = _rss(coord.pid)
        body = b"x" * (60 * 1024 * 1024)  # over the 50 MB limit, under twice it
        for _ in range(8):
            (r,) = c.send_batch([Message("s@src.test", ["big@dst.test"], body)])
            assert not r.ok and "exceeds" in str(r.error)
        c.request("ping")
        after = _rss(coord.pid)
    assert after - before < 100 * 1024 * 1024, f"RSS grew by {(after - before) >> 20} MiB"


def _zmtp_dealer(port: int) -> socket.socket:
    """Open a raw ZMTP 3.0 connection as a DEALER (greeting and READY by hand)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
    sock.sendall(greeting + b"\x00" + b"\x00" * 31)
    got = b""
    while len(got) < 64:
        chunk = sock.recv(64 - len(got))
        assert chunk, "no ZMTP greeting"
        got += chunk
    prop = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    body = b"\x05READY" + prop
    sock.sendall(b"\x04" + bytes([len(body)]) + body)
    return sock


def test_a_frame_declaring_8_gib_is_dropped_not_buffered(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, _ = boot(cluster, make_policy)
    port = int(coord.info["endpoint"].rsplit(":", 1)[1])
    before = _rss(coord.pid)
    sock = _zmtp_dealer(port)
    try:
        sock.sendall(b"\x02" + struct.pack(">Q", 8 << 30))  # one long frame of 8 GiB
        chunk = b"y" * (1 << 20)
        closed = False
        try:
            for _ in range(200):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if not closed:
            sock.settimeout(10)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed, "the coordinator kept reading the 8 GiB frame"
    finally:
        sock.close()
    assert _rss(coord.pid) - before < 64 * 1024 * 1024
    with Client(coord.info["endpoint"]) as c:
        assert c.request("ping") == {"pong": True}
