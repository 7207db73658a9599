"""The SMTP engine's timers: one per connection, moved lazily, each step still bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from kumopy.ipc.jobs import Job
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.protocol import ClientProtocol
from kumopy.smtp.wire import encode_data
from kumopy.worker.idle import IdleClock
from tests.smtp_peer import Scripted

BODY = encode_data(b"Subject: timers\n\nbody\n")


async def _protocol_on_socketpair() -> tuple[ClientProtocol, socket.socket]:
    """Return a connected ClientProtocol and the peer's end of its socket."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    proto = ClientProtocol(loop)
    await loop.create_connection(lambda: proto, sock=ours)
    proto.owed = 0  # no banner on a socketpair
    return proto, theirs


def test_a_deadline_moved_later_is_kept_by_the_timer_armed_earlier() -> None:
    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        proto, peer = await _protocol_on_socketpair()
        try:
            proto.arm(0.05)  # a short wait that ends at once: its timer stays armed
            proto.disarm()
            proto.write(b"NOOP\r\n")
            loop.call_later(0.2, peer.send, b"250 2.0.0 Ok\r\n")
            t0 = time.monotonic()
            reply = await proto.reply(0.4, "NOOP")
            answered = time.monotonic() - t0
            assert reply.code == 250 and reply.command == "NOOP"
            proto.write(b"NOOP\r\n")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await proto.reply(0.3, "NOOP")
            return answered, time.monotonic() - t0
        finally:
            peer.close()
            assert proto.transport is not None
            proto.transport.close()

    answered, timed_out = asyncio.run(go())
    assert 0.15 < answered < 0.4
    assert 0.25 < timed_out < 1.0


def test_transactions_on_one_session_schedule_no_timer() -> None:
    scheduled: list[float] = []

    async def go() -> list[int]:
        loop: Any = asyncio.get_running_loop()
        real_call_at = loop.call_at

        def counting_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> Any:
            if isinstance(getattr(callback, "__self__", None), ClientProtocol):
                scheduled.append(when)
            return real_call_at(when, callback, *args, **kw)

        loop.call_at = counting_call_at  # the asyncio loop is a Python object: patch this one
        async with Scripted("PIPELINING") as peer:
            client = SMTPClient()
            await client.connect("127.0.0.1", peer.port, source_address=None, ehlo_domain="c.test")
            before = len(scheduled)
            codes = []
            for i in range(20):
                then = ("s@x.test", [f"r{i + 1}@y.test"], BODY) if i < 19 else None
                result = await client.send_transaction(
                    "s@x.test", [f"r{i}@y.test"], BODY, then=then
                )
                codes.append(result.replies[0].code)
            assert len(scheduled) == before, "a transaction scheduled a timer of its own"
            await client.quit()
            return codes

    assert asyncio.run(go()) == [250] * 20
    assert 1 <= len(scheduled) <= 3  # the banner's, and QUIT's shorter one


def test_idle_clock_expires_only_the_wait_at_its_deadline() -> None:
    async def go() -> tuple[Job | None, bool, float]:
        loop = asyncio.get_running_loop()
        clock = IdleClock(loop)
        first: asyncio.Future[Job | None] = loop.create_future()
        clock.start(first, 0.05)
        first.set_result(None)  # answered at once (as submit() does with a job)
        clock.stop()
        second: asyncio.Future[Job | None] = loop.create_future()
        t0 = time.monotonic()
        clock.start(second, 0.3)
        await asyncio.sleep(0.15)
        early = second.done()
        got = await second
        elapsed = time.monotonic() - t0
        clock.close()
        return got, early, elapsed

    got, early, elapsed = asyncio.run(go())
    assert got is None and not early
    assert 0.25 < elapsed < 1.0
