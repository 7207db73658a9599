"""kumopy.smtp.replies and kumopy.smtp.client against real peers: our sink and aiosmtpd."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from kumopy.errors import (
    DeliveryError,
    InjectionError,
    ProtocolError,
    SMTPReplyError,
    SourceBindError,
)
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.protocol import END_OF_DATA, Timeouts
from kumopy.smtp.replies import Reply, ReplyReader, parse_reply
from kumopy.smtp.wire import encode_data, wire_address
from tests.smtp_peer import AiosmtpdPeer, Peer, Scripted, refusing_port, running_sink

T = TypeVar("T")
BODY = encode_data(b"Subject: test\n\n.leading dot\nbody\n")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine on a fresh asyncio loop (the worker uses uvloop; both must work)."""

    async def main() -> T:
        return await factory()

    return asyncio.run(main())


async def connected(port: int, host: str = "127.0.0.1", **kwargs: object) -> SMTPClient:
    client = SMTPClient()
    kwargs.setdefault("source_address", None)
    kwargs.setdefault("ehlo_domain", "client.test")
    await client.connect(host, port, **kwargs)  # type: ignore[arg-type]
    return client


# -- replies -------------------------------------------------------------------------------------


def test_parse_reply_single_and_multi_line() -> None:
    r = parse_reply([b"250 2.1.5 Recipient ok\r\n"])
    assert (r.code, r.enhanced_code, r.text, r.command) == (250, "2.1.5", "Recipient ok", None)
    assert r.is_positive and not r.is_transient and not r.is_permanent
    multi = parse_reply([b"451-4.3.0 first\r\n", b"451-4.3.0 second\r\n", b"451 4.3.0 third"])
    assert (multi.code, multi.enhanced_code) == (451, "4.3.0")
    assert multi.text == "first\nsecond\nthird" and multi.is_transient
    assert str(multi).startswith("451 4.3.0 first")


@pytest.mark.parametrize(
    ("line", "enhanced", "text"),
    [
        (b"250 ok", None, "ok"),
        (b"250 5.1.1 class does not match", None, "5.1.1 class does not match"),
        (b"550 5.1.10 big detail", "5.1.10", "big detail"),
        (b"550 5.1.1", "5.1.1", ""),
        (b"250", None, ""),
        (b"220 host ESMTP \xff", None, "host ESMTP \ufffd"),
    ],
)
def test_parse_reply_enhanced_codes(line: bytes, enhanced: str | None, text: str) -> None:
    for form in (line, line + b"\r\n"):
        reply = parse_reply([form])
        assert (reply.enhanced_code, reply.text) == (enhanced, text)
        assert ReplyReader().feed(form + b"\r\n" if form == line else form) == [reply]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([], "empty"),
        ([b"hello"], "malformed"),
        ([b"25 x"], "malformed"),
        ([b"250x"], "malformed"),
        ([b"199 x"], "out of range"),
        ([b"250-a", b"251 b"], "mixes codes"),
        ([b"250 a", b"250 b"], "continuation"),
        ([b"250-a"], "continuation"),
    ],
)
def test_parse_reply_malformed(lines: list[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_reply(lines)


def test_reply_reader_is_incremental() -> None:
    stream = b"250-first\r\n250-SIZE 10\r\n250 PIPELINING\r\n354 go ahead\n250 2.0.0 ok\r\n"
    whole = ReplyReader().feed(stream)
    assert [r.code for r in whole] == [250, 354, 250]
    reader = ReplyReader()
    trickled: list[Reply] = []
    for i in range(len(stream)):
        trickled += reader.feed(stream[i : i + 1])
    assert trickled == whole and not reader.pending
    with pytest.raises(ProtocolError, match="longer than"):
        ReplyReader().feed(b"250 " + b"x" * 9000)


def test_timeouts_defaults_and_validation() -> None:
    t = Timeouts()
    assert (t.connect, t.banner, t.ehlo, t.mail_from, t.rcpt_to) == (60, 60, 300, 300, 300)
    assert (t.data, t.data_dot, t.idle) == (300, 300, 5)
    assert (t.starttls, t.data_block) == (60, 180)
    with pytest.raises(ValueError, match="data_dot"):
        Timeouts(data_dot=0)


# -- sessions against our sink -------------------------------------------------------------------


def test_source_address_ehlo_and_per_recipient_outcomes() -> None:
    with running_sink(raw=True) as sink:

        async def go() -> tuple[SMTPClient, list[Reply]]:
            client = await connected(sink.port, source_address="127.0.0.2", ehlo_domain="a.test")
            assert client.pipelining and client.max_size == 52428800
            rcpts = ["ok@x.test", "reject-1@x.test", "tempfail-1@x.test", "ok2@x.test"]
            result = await client.send_transaction("s@a.test", rcpts, BODY)
            await client.quit()
            return client, result.replies

        client, replies = run(go)
        assert client.local_address == "127.0.0.2" and client.peer_address == "127.0.0.1"
        assert [(r.code, r.command) for r in replies] == [
            (250, END_OF_DATA),
            (550, "RCPT TO"),
            (451, "RCPT TO"),
            (250, END_OF_DATA),
        ]
        (rec,) = sink.wait_for(1)
        assert rec["peer_ip"] == "127.0.0.2" and rec["helo"] == "a.test"
        assert rec["peer_port"] == client.local_port
        assert rec["rcpt_to"] == ["ok@x.test", "ok2@x.test"] and rec["pipelined"] is True
        assert rec["raw"] == BODY and not rec["bare_lf_or_cr"]


def test_no_source_address_leaves_from_127_0_0_1() -> None:
    with running_sink() as sink:

        async def go() -> SMTPClient:
            client = await connected(sink.port)
            await client.send_transaction("", ["r@x.test"], BODY)
            await client.quit()
            return client

        client = run(go)
        assert client.local_address == "127.0.0.1"
        assert sink.wait_for(1)[0]["peer_ip"] == "127.0.0.1"


def test_ipv6_source_to_ipv6_peer() -> None:
    with running_sink("::1") as sink:

        async def go() -> SMTPClient:
            client = await connected(sink.port, host="::1", source_address="::1")
            await client.send_transaction("s@x.test", ["r@x.test"], BODY)
            await client.quit()
            return client

        assert run(go).local_address == "::1"
        assert sink.wait_for(1)[0]["peer_ip"] == "::1"


def test_all_rejected_sends_no_body_and_session_stays_usable() -> None:
    for pipelining in (True, False):
        with running_sink(pipelining=pipelining) as sink:

            async def go() -> list[list[int]]:
                client = await connected(sink.port)
                first = await client.send_transaction("s@x.test", ["reject-1@x.test"], BODY)
                assert client.usable
                second = await client.send_transaction("s@x.test", ["ok@x.test"], BODY)
                await client.quit()
                return [[r.code for r in first.replies], [r.code for r in second.replies]]

            assert run(go) == [[550], [250]]
            assert [r["rcpt_to"] for r in sink.wait_for(1)] == [["ok@x.test"]]
            assert sink.messages == 1


def test_data_failure_applies_to_every_accepted_recipient() -> None:
    with running_sink() as sink:

        async def go() -> list[Reply]:
            client = await connected(sink.port)
            rcpts = ["a@x.test", "datafail-1@x.test", "reject-2@x.test"]
            result = await client.send_transaction("s@x.test", rcpts, BODY)
            await client.quit()
            return result.replies

        a, b, c = run(go)
        assert a == b and (a.code, a.enhanced_code, a.command) == (451, "4.3.0", END_OF_DATA)
        assert c.code == 550


def test_send_ahead_pipelines_the_next_envelope_behind_the_body() -> None:
    with running_sink(raw=True) as sink:

        async def go() -> list[int]:
            client = await connected(sink.port)
            nxt = ("s2@x.test", ["r2@x.test"], BODY)
            first = await client.send_transaction("s1@x.test", ["r1@x.test"], BODY, then=nxt)
            second = await client.send_transaction(*nxt)
            with pytest.raises(RuntimeError, match="does not match"):
                await client.send_transaction("s3@x.test", ["r3@x.test"], BODY, then=nxt)
                await client.send_transaction("other@x.test", ["r2@x.test"], BODY)
            return [first.replies[0].code, second.replies[0].code]

        assert run(go) == [250, 250]
        recs = sink.wait_for(3)
        assert [r["mail_from"] for r in recs] == ["s1@x.test", "s2@x.test", "s3@x.test"]
        assert all(r["raw"] == BODY for r in recs)


def test_unsafe_address_is_refused_before_the_wire() -> None:
    with running_sink() as sink:

        async def go() -> int:
            client = await connected(sink.port)
            with pytest.raises(InjectionError, match="not allowed on the wire"):
                await client.send_transaction("s@x.test", ["a@x.test\r\nRCPT TO:<b@x>"], BODY)
            with pytest.raises(InjectionError):
                await client.send_transaction("s@x.test\r\nRSET", ["a@x.test"], BODY)
            ok = await client.send_transaction("s@x.test", ["a@x.test"], BODY)
            await client.quit()
            return ok.replies[0].code

        assert run(go) == 250
        assert [r["rcpt_to"] for r in sink.wait_for(1)] == [["a@x.test"]]


def test_size_limit_is_checked_before_sending() -> None:
    with running_sink(max_size=100) as sink:

        async def go() -> Reply:
            client = await connected(sink.port)
            result = await client.send_transaction(
                "s@x.test", ["a@x.test"], b"x" * 200 + b"\r\n.\r\n"
            )
            await client.quit()
            return result.replies[0]

        reply = run(go)
        assert (reply.code, reply.enhanced_code, reply.command) == (552, "5.3.4", None)
        assert sink.messages == 0


def test_timeout_after_the_dot_is_a_possible_duplicate() -> None:
    with running_sink(slow_delay=5.0) as sink:

        async def go() -> tuple[bool, list[Reply], bool]:
            client = await connected(sink.port, timeouts=Timeouts(data_dot=0.2))
            result = await client.send_transaction("s@x.test", ["slow-1@x.test", "b@x.test"], BODY)
            return result.possible_duplicate, result.replies, client.usable

        duplicate, replies, usable = run(go)
        assert duplicate and not usable
        for r in replies:
            assert (r.code, r.enhanced_code, r.command) == (451, "4.4.2", None)
            assert "timed out after 0.2s waiting for the reply to the final dot" in r.text
        assert sink.wait_for(1)[0]["rcpt_to"] == ["slow-1@x.test", "b@x.test"]


def test_greeting_421_and_connect_failures() -> None:
    with running_sink(greeting_code=421) as sink:
        with pytest.raises(SMTPReplyError) as info:
            run(lambda: connected(sink.port))
        assert info.value.reply.code == 421 and info.value.reply.command == "banner"
    with refusing_port() as port:
        with pytest.raises(DeliveryError, match="Connection refused") as refused:
            run(lambda: connected(port, source_address="127.0.0.3"))
        assert f"127.0.0.1:{port} from 127.0.0.3" in refused.value.message
        assert not isinstance(refused.value, SourceBindError)
    with pytest.raises(
        DeliveryError, match=r"cannot bind source address 192\.0\.2\.1: Cannot assign"
    ) as bind:
        run(lambda: connected(1, source_address="192.0.2.1"))
    assert isinstance(bind.value, SourceBindError)
    assert bind.value.address == "192.0.2.1" and bind.value.errno_name == "EADDRNOTAVAIL"


def test_banner_timeout() -> None:
    with (
        running_sink(greeting_delay=3.0) as sink,
        pytest.raises(DeliveryError, match=r"timed out after 0\.2s waiting for the banner"),
    ):
        run(lambda: connected(sink.port, timeouts=Timeouts(banner=0.2)))


# -- against aiosmtpd, a third-party server without PIPELINING -----------------------------------


def test_step_by_step_against_aiosmtpd() -> None:
    with AiosmtpdPeer() as peer:

        async def go() -> tuple[SMTPClient, list[list[Reply]]]:
            client = await connected(peer.port, source_address="127.0.0.4", ehlo_domain="b.test")
            assert not client.pipelining and "8BITMIME" in client.extensions
            out = []
            for sender, rcpts in (
                ("s@x.test", ["a@y.test", "reject-1@y.test", "b@y.test"]),
                ("blocked@x.test", ["c@y.test", "d@y.test"]),
                ("s@x.test", ["reject-2@y.test"]),
                ("s@x.test", ["e@y.test"]),
            ):
                out.append((await client.send_transaction(sender, rcpts, BODY)).replies)
            await client.quit()
            return client, out

        _, (mixed, blocked, rejected, last) = run(go)
        assert [(r.code, r.command) for r in mixed] == [
            (250, END_OF_DATA),
            (550, "RCPT TO"),
            (250, END_OF_DATA),
        ]
        assert [(r.code, r.command, r.enhanced_code) for r in blocked] == [
            (550, "MAIL FROM", "5.7.1")
        ] * 2
        assert [r.code for r in rejected] == [550] and last[0].code == 250
        first, second = peer.received
        assert first.peer[0] == "127.0.0.4" and first.helo == "b.test"
        assert first.rcpt_tos == ["a@y.test", "b@y.test"] and second.rcpt_tos == ["e@y.test"]
        assert first.content == b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n"


def test_helo_fallback_when_ehlo_is_refused() -> None:
    with AiosmtpdPeer(ehlo_refused=True) as peer:

        async def go() -> tuple[Reply, dict[str, str], int]:
            client = SMTPClient()
            reply = await client.connect(
                "127.0.0.1", peer.port, source_address=None, ehlo_domain="old.test"
            )
            result = await client.send_transaction("s@x.test", ["a@y.test"], BODY)
            await client.quit()
            return reply, client.extensions, result.replies[0].code

        reply, extensions, code = run(go)
        assert reply.command == "HELO" and extensions == {} and code == 250
        assert peer.received[0].helo == "old.test"


def test_invalid_ehlo_domain() -> None:
    with pytest.raises(ValueError, match="EHLO domain"):
        run(lambda: connected(1, ehlo_domain="bad name"))


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
@pytest.mark.parametrize(
    ("verb", "field", "step"),
    [
        ("EHLO", "ehlo", "EHLO"),
        ("MAIL", "mail_from", "MAIL FROM"),
        ("RCPT", "rcpt_to", "RCPT TO"),
        ("DATA", "data", "DATA"),
    ],
)
def test_each_step_has_its_own_timeout(verb: str, field: str, step: str, pipelining: bool) -> None:
    # Every other timeout stays long: only the one of the stalled step can end the wait.
    timeouts = Timeouts(**{field: 0.3})
    extensions = ("PIPELINING",) if pipelining else ()

    async def go() -> tuple[list[Reply], bool, bool]:
        async with Scripted(*extensions, stall_at=verb) as peer:
            client = await connected(peer.port, timeouts=timeouts)
            result = await client.send_transaction("s@x.test", ["a@y.test"], BODY)
            return result.replies, result.possible_duplicate, client.usable

    if verb == "EHLO":
        expected = r"timed out after 0\.3s waiting for the reply to EHLO"
        with pytest.raises(DeliveryError, match=expected):
            run(go)
        return
    (reply,), duplicate, usable = run(go)
    assert (reply.code, reply.enhanced_code) == (451, "4.4.2")
    assert f"timed out after 0.3s waiting for the reply to {step}" in reply.text
    assert not duplicate and not usable  # nothing of the body went: no duplicate is possible


def test_body_write_is_bounded_by_data_block() -> None:
    # Far more than the socket buffers hold, to a peer that stops reading after 354.
    payload = (b"x" * 998 + b"\r\n") * 32768 + b".\r\n"

    async def go() -> tuple[list[Reply], bool]:
        async with Scripted("PIPELINING", stall_body=True) as peer:
            client = await connected(peer.port, timeouts=Timeouts(data_block=0.3, data=30))
            result = await client.send_transaction("s@x.test", ["a@y.test"], payload)
            return result.replies, result.possible_duplicate

    (reply,), duplicate = run(go)
    assert (reply.code, reply.enhanced_code) == (451, "4.4.2") and not duplicate
    assert "timed out after 0.3s waiting for the reply to message body" in reply.text


# -- SMTPUTF8 (RFC 6531) -------------------------------------------------------------------------

UTF8_SENDER = "jörg@bücher.test"
UTF8_RCPTS = ["用户@例子.test", "plain@y.test"]


def test_wire_address_writes_utf8_only_when_told() -> None:
    assert wire_address("jörg@bücher.test", utf8=True) == "jörg@bücher.test".encode()
    assert wire_address('"jö rg"@x.test', utf8=True) == '"jö rg"@x.test'.encode()
    with pytest.raises(InjectionError, match="needs an SMTPUTF8 session"):
        wire_address("jörg@x.test")
    for bad in ("jö\r\nRSET@x.test", "jö rg@x.test", "<jö>@x.test"):
        with pytest.raises(InjectionError, match="not allowed on the wire"):
            wire_address(bad, utf8=True)
    with pytest.raises(InjectionError, match="not valid Unicode"):
        wire_address("j\udcffrg@x.test", utf8=True)


def test_smtputf8_against_aiosmtpd() -> None:
    with Peer(smtputf8=True) as peer:

        async def go() -> list[int]:
            client = await connected(peer.port)
            assert "SMTPUTF8" in client.extensions
            result = await client.send_transaction(UTF8_SENDER, UTF8_RCPTS, BODY)
            await client.quit()
            return [r.code for r in result.replies]

        assert run(go) == [250, 250]
        (seen,) = peer.received
        assert seen.mail_from == UTF8_SENDER and seen.rcpt_tos == UTF8_RCPTS
        assert "SMTPUTF8" in seen.options


def test_smtputf8_on_the_wire_with_8bitmime_and_pipelining() -> None:
    body = encode_data("Subject: grüße\n\nbody\n".encode())

    async def go() -> tuple[list[bytes], list[int]]:
        async with Scripted("PIPELINING", "8BITMIME", "SMTPUTF8") as peer:
            client = await connected(peer.port)
            result = await client.send_transaction(UTF8_SENDER, UTF8_RCPTS, body)
            await client.quit()
            return peer.lines, [r.code for r in result.replies]

    lines, codes = run(go)
    assert codes == [250, 250]
    assert lines[1:4] == [
        f"MAIL FROM:<{UTF8_SENDER}> BODY=8BITMIME SMTPUTF8\r\n".encode(),
        f"RCPT TO:<{UTF8_RCPTS[0]}>\r\n".encode(),
        b"RCPT TO:<plain@y.test>\r\n",
    ]


def test_non_ascii_envelope_without_smtputf8_fails_every_recipient_unsent() -> None:
    with Peer() as peer:

        async def go() -> tuple[list[Reply], int]:
            client = await connected(peer.port)
            refused = await client.send_transaction("s@x.test", UTF8_RCPTS, BODY)
            ok = await client.send_transaction("s@x.test", ["a@y.test"], BODY)
            await client.quit()
            return refused.replies, ok.replies[0].code

        replies, ok = run(go)
        assert ok == 250 and len(replies) == 2
        for r in replies:
            assert (r.code, r.enhanced_code, r.command) == (553, "5.6.7", None)
            assert r.text == (
                f"kumopy: non-ASCII address {UTF8_RCPTS[0]!r} needs SMTPUTF8, which 127.0.0.1 "
                "does not offer"
            )
        assert peer.handler.mails == ["s@x.test"]  # only the ASCII transaction was sent


def test_non_ascii_envelope_is_not_sent_ahead_to_a_peer_without_smtputf8() -> None:
    async def go() -> tuple[list[bytes], list[int]]:
        async with Scripted("PIPELINING") as peer:
            client = await connected(peer.port)
            nxt = (UTF8_SENDER, ["a@y.test"], BODY)
            first = await client.send_transaction("s@x.test", ["a@y.test"], BODY, then=nxt)
            second = await client.send_transaction(*nxt)
            await client.quit()
            return peer.lines, [first.replies[0].code, second.replies[0].code]

    lines, codes = run(go)
    assert codes == [250, 553]
    assert [line.split(b":")[0] for line in lines if line.startswith(b"MAIL")] == [b"MAIL FROM"]


# -- 452: too many recipients (RFC 5321 4.5.3.1.10) ----------------------------------------------


def test_452_at_rcpt_asks_for_another_transaction_serial() -> None:
    rcpts = [f"r{i}@y.test" for i in range(5)]
    with Peer(rcpt_limit=2) as peer:

        async def go() -> tuple[list[int], list[int], list[int]]:
            client = await connected(peer.port)
            first = await client.send_transaction("s@x.test", rcpts, BODY)
            rest = [rcpts[i] for i in first.again]
            second = await client.send_transaction("s@x.test", rest, BODY)
            await client.quit()
            return [r.code for r in first.replies], first.again, second.again

        codes, again, again2 = run(go)
        assert codes == [250, 250, 452, 452, 452] and again == [2, 3, 4] and again2 == [2]
        # Serially, kumopy stops asking after the first 452: the limit is reached.
        assert peer.handler.rcpts == rcpts[:3] + rcpts[2:]
        assert [m.rcpt_tos for m in peer.received] == [rcpts[:2], rcpts[2:4]]


@pytest.mark.parametrize("limit_reply", [b"452 4.5.3 Too many recipients", b"552 5.5.3 Too many"])
def test_452_at_rcpt_asks_for_another_transaction_pipelined(limit_reply: bytes) -> None:
    rcpts = ["full-1@y.test", "a@y.test", "full-2@y.test", "b@y.test", "c@y.test"]

    async def go() -> tuple[list[Reply], list[int]]:
        async with Scripted("PIPELINING", rcpt_limit=2, limit_reply=limit_reply) as peer:
            client = await connected(peer.port)
            result = await client.send_transaction("s@x.test", rcpts, BODY)
            await client.quit()
            assert len(peer.messages) == 1
            return result.replies, result.again

    replies, again = run(go)
    # A full mailbox (4.2.2) is an ordinary deferral; only the limit asks for a new transaction.
    assert again == [4]
    assert [(r.code, r.enhanced_code) for r in replies[:4]] == [
        (452, "4.2.2"),
        (250, "2.0.0"),
        (452, "4.2.2"),
        (250, "2.0.0"),
    ]
    last = replies[4]
    assert last.is_transient and last.command == "RCPT TO"
    if limit_reply.startswith(b"552"):
        assert (last.code, last.enhanced_code) == (452, "4.5.3")
        assert last.text == "kumopy: too many recipients in one transaction (552 5.5.3 Too many)"


def test_452_to_the_first_recipient_is_not_a_limit() -> None:
    async def go() -> list[int]:
        async with Scripted("PIPELINING", rcpt_limit=0) as peer:
            client = await connected(peer.port)
            result = await client.send_transaction("s@x.test", ["a@y.test", "b@y.test"], BODY)
            await client.quit()
            return result.again

    assert run(go) == []
