"""RFC 5321 envelope address syntax: validate_address, wire_address, and on the wire for real."""

from __future__ import annotations

import asyncio
import base64
import random
import re

import pytest

from kumopy.client import Client, Message
from kumopy.errors import InjectionError
from kumopy.harness import wait_for
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.wire import encode_data, validate_address, wire_address
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import ONE_SOURCE, boot

VALID = [
    "user@example.com",
    "first.last+tag@mail.sub.example.co",
    "!#$%&'*+-/=?^_`{|}~@x.test",
    "a.b.c@x.test",
    "UPPER.Case@X.Test",
    '"a b"@x.test',
    '"a\\"b"@x.test',
    '"a\\\\b"@x.test',
    '"a@b"@x.test',
    '"john smith"@dst.test',
    '""@x.test',
    '"a..b."@x.test',
    '"<angle> [x]; (c), :"@x.test',
    '"\\ \\a\\~"@x.test',
    '"abc"@x.test',
    "l" * 64 + "@x.test",
    '"' + "q" * 62 + '"@x.test',
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@[ipv6:2001:db8::1]",
    '"a b"@[IPv6:::1]',
    "user@localhost",
    "x@" + "d" * 63 + ".test",
    "l" * 64 + "@" + ("d" * 62 + ".") * 2 + "d" * 59 + ".com",  # exactly 254 octets
    # RFC 6531 (SMTPUTF8): UTF-8 local parts and U-label domains.
    "jörg@x.test",
    '"jö rg"@x.test',
    "a@exämple.test",
    "用户@例子.广告",
    "j" * 32 + "ö" * 16 + "@x.test",  # exactly 64 octets
]

INVALID = [
    ('"@x', "unterminated quoted local part"),
    ('"unterminated@x.test', "unterminated quoted local part"),
    ('"abc\\"@x.test', "unterminated quoted local part (its last quote is escaped"),
    ('"abc\\@x.test', "unterminated quoted local part"),
    ("a..b@x", "empty atom (two dots in a row)"),
    (".a@x", "empty atom (local part starts with a dot)"),
    ("a.@x", "empty atom (local part ends with a dot)"),
    (".@x.test", "empty atom (local part starts with a dot)"),
    ('a"b@x.test', "a quote may only enclose the whole local part"),
    ('"a"b@x.test', "'b' after the closing quote of the quoted local part"),
    ('"a".b@x.test', "'.b' after the closing quote"),
    ('"a\x01"@x.test', "character '\\x01' not allowed in a quoted local part"),
    ('"a\\\x01"@x.test', "character '\\x01' not allowed in a quoted local part"),
    ('"a\x7f"@x.test', "character '\\x7f' not allowed in a quoted local part"),
    ('"a\tb"@x.test', "character '\\t' not allowed in a quoted local part"),
    ('"a"\r\nRCPT TO:<c@z>', "character '\\r' not allowed in a quoted local part"),
    ("b@y.test\r\nRCPT TO:<c@z>", "contains control character '\\r'"),
    ("a\x00@x.test", "contains control character '\\x00'"),
    ("no-at\n", "contains control character '\\n'"),
    ("a b@x.test", "contains a space, allowed only in a quoted local part"),
    ("a(b)@x.test", "contains character '(', allowed only in a quoted local part"),
    ("a\\b@x.test", "contains character '\\\\', allowed only in a quoted local part"),
    ("a,b@x.test", "contains character ','"),
    ("<a@x.test", "contains an angle bracket"),
    ("a@x.test>", "contains an angle bracket in the domain"),
    ("a@b@x.test", "more than one '@' outside a quoted local part"),
    ("l" * 65 + "@x.test", "local part longer than 64 octets"),
    ('"' + "q" * 63 + '"@x.test', "local part longer than 64 octets"),
    ("l" * 64 + "@" + ("d" * 62 + ".") * 2 + "d" * 60 + ".com", "longer than 254 octets"),
    ("a@ex\u00e4mple-.test", "invalid internationalized domain"),
    ("\ud800@x.test", "lone surrogate"),
    ("j" * 32 + "ö" * 17 + "@x.test", "local part longer than 64 octets"),
    ("user.x.test", "missing '@'"),
    ("@x.test", "empty local part"),
    ('"a b"@', "empty domain"),
    ("a@x..test", "empty label"),
    ("a@-x.test", "invalid domain label '-x'"),
    ("a@" + "d" * 64 + ".test", "invalid domain label"),
    ('"a b"@exa mple.test', "contains a space in the domain"),
    ("user@[127.0.0]", "invalid address literal"),
    ("user@[IPv6:::g]", "invalid address literal"),
    ("user@[300.1.1.1]", "invalid address literal"),
    ("user@[127.0.0.1", "unterminated address literal"),
]


@pytest.mark.parametrize("addr", VALID)
def test_valid_addresses_are_accepted_and_sent_as_given(addr: str) -> None:
    assert validate_address(addr) == addr
    assert validate_address(addr, where="sender") == addr
    assert wire_address(addr, utf8=True) == addr.encode("utf-8")
    if addr.isascii():
        assert wire_address(addr) == addr.encode("ascii")


@pytest.mark.parametrize(("addr", "problem"), INVALID)
def test_invalid_addresses_are_refused_with_the_reason(addr: str, problem: str) -> None:
    with pytest.raises(InjectionError) as info:
        validate_address(addr, where="recipients[3]")
    message = str(info.value)
    assert message.startswith(f"recipients[3] {addr!r}: "), message
    assert problem in message


# The RFC 5321 (4.1.2) Mailbox ABNF, transcribed as plainly as possible, as an oracle.
# RFC 5321 with RFC 6531's UTF8-non-ascii added to atext and qtextSMTP.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_ORACLE_LOCAL = re.compile(
    rf'{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
)


def _oracle_accepts(local: str) -> bool:
    return len(local.encode()) <= 64 and _ORACLE_LOCAL.fullmatch(local) is not None


def test_random_local_parts_follow_the_abnf_and_wire_agrees() -> None:
    rng = random.Random(5321)
    alphabet = ["a", "Z", "9", ".", '"', "\\", " ", "@", "<", ">", "!", "(", "\r", "\x00", "ü"]
    accepted = 0
    for _ in range(20_000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        if rng.random() < 0.5:
            local = f'"{local}"'
        addr = f"{local}@x.test"
        try:
            validate_address(addr)
        except InjectionError:
            ok = False
        else:
            ok = True
        assert ok == _oracle_accepts(local), addr
        if ok:
            accepted += 1
            assert wire_address(addr, utf8=True) == addr.encode("utf-8")
    assert accepted > 1000  # the table above is not mostly refusals


@pytest.mark.parametrize(
    ("addr", "shown"),
    [
        ("a@x.test\r\nRSET", "'\\r'"),
        ("a\n@x.test", "'\\n'"),
        ("a\x00@x.test", "'\\x00'"),
        ('"a b\x00"@x.test', "'\\x00'"),
        ('"a b"@x.test\r\nRSET', "'\\r'"),
        ('"a\r\nb"@x.test', "'\\r'"),
        ("a\t@x.test", "'\\t'"),
        ("a\x7f@x.test", "'\\x7f'"),
        ("a b@x.test", "' '"),
        ('"a b"@x y.test', "' '"),
        ("<a@x.test", "'<'"),
        ('"a<b"@x.test>', "'>'"),
        ('"a b@x.test', "' '"),
    ],
)
def test_wire_address_refuses_what_breaks_the_command(addr: str, shown: str) -> None:
    with pytest.raises(InjectionError, match="not allowed on the wire") as info:
        wire_address(addr)
    assert f"contains {shown}" in str(info.value)


def test_wire_address_names_smtputf8_for_non_ascii() -> None:
    for addr in ("ü@x.test", '"ü b"@x.test', "a@exämple.test"):
        with pytest.raises(InjectionError, match="SMTPUTF8"):
            wire_address(addr, where="sender")


def test_quoted_addresses_go_on_the_wire_byte_for_byte() -> None:
    """Drive SMTPClient against a peer that records each command line as it arrived."""

    async def go() -> list[bytes]:
        lines: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 rec.test ESMTP\r\n")
            while line := await reader.readline():
                lines.append(line)
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    await reader.readuntil(b"\r\n.\r\n")
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = SMTPClient()
        await client.connect("127.0.0.1", port, source_address=None, ehlo_domain="c.test")
        rcpts = ['"john smith"@dst.test', '"a@b"@dst.test', "plain@dst.test"]
        body = encode_data(b"Subject: x\r\n\r\nhi\r\n")
        result = await client.send_transaction('"a\\"b"@src.test', rcpts, body)
        assert [r.code for r in result.replies] == [250, 250, 250]
        await client.quit()
        server.close()
        await server.wait_closed()
        return lines

    lines = asyncio.run(go())
    assert lines[1:5] == [
        b'MAIL FROM:<"a\\"b"@src.test>\r\n',
        b'RCPT TO:<"john smith"@dst.test>\r\n',
        b'RCPT TO:<"a@b"@dst.test>\r\n',
        b"RCPT TO:<plain@dst.test>\r\n",
    ]


@pytest.mark.integration
def test_quoted_recipient_delivered_and_long_line_refused(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(ONE_SOURCE), sink_raw=True)
    body = b"Subject: quoted\r\n\r\nhello\r\n"
    long_body = b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y" * 1200 + b"\r\n"
    with Client(coord.info["endpoint"]) as client:
        results = client.send_batch(
            [
                Message("s@src.test", ['"john smith"@dst.test'], body),
                Message("s@src.test", ["long@dst.test"], long_body),
                Message("s@src.test", ["a..b@dst.test"], body),
            ]
        )
    assert results[0].ok, results[0].error
    assert not results[1].ok and not results[2].ok
    assert "message line 4 is 1200 octets long" in str(results[1].error)
    assert "RFC 5322 allows at most 998" in str(results[1].error)
    assert "quoted-printable or base64" in str(results[1].error)
    assert "empty atom (two dots in a row)" in str(results[2].error)
    (rec,) = records.wait_count(1, 30)
    # The sink takes what stands between "RCPT TO:<" and ">": the quoted form, unchanged.
    assert rec["rcpt_to"] == ['"john smith"@dst.test'] and rec["code"] == 250
    assert base64.b64decode(rec["data"]) == body
    wait_for(
        lambda: any(r["type"] == "Delivery" for r in cluster.records(coord)),
        30,
        "a Delivery record",
    )
    (delivery,) = [r for r in cluster.records(coord) if r["type"] == "Delivery"]
    assert delivery["recipient"] == '"john smith"@dst.test'
    assert len(records.refresh()) == 1  # nothing else reached the sink
