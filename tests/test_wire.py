"""kumopy.smtp.wire: DATA encoding (line endings, dot-stuffing), address checks, line length."""

from __future__ import annotations

import random
import re

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kumopy.errors import InjectionError
from kumopy.smtp.wire import (
    check_line_length,
    decode_data,
    domain_of,
    encode_data,
    validate_address,
    wire_address,
)
from tests.conftest_fast import FastImpl, no_extensions


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"..", b"...\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b".start", b"..start\r\n.\r\n"),
        (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n..\r\n", b"a\r\n...\r\n.\r\n"),
        (b"a\n.b", b"a\r\n..b\r\n.\r\n"),
        (b"a\r.b", b"a\r\n..b\r\n.\r\n"),
        (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
        (b"a\n\rb\r", b"a\r\n\r\nb\r\n.\r\n"),
        (b"x.y\r\nz.\r\n", b"x.y\r\nz.\r\n.\r\n"),
    ],
)
def test_encode_data_exact(message: bytes, wire: bytes, fast_impl: FastImpl) -> None:
    assert fast_impl.encode_data(message) == wire
    assert fast_impl.encode_data(memoryview(message)) == wire


def test_encode_data_clean_body_is_unchanged_apart_from_terminator(fast_impl: FastImpl) -> None:
    body = b"Subject: x\r\n\r\n" + b"line of text\r\n" * 1000
    assert fast_impl.encode_data(body) == body + b".\r\n"


def _oracle_normalise(data: bytes) -> bytes:
    """Normalise line endings the slow, obvious way (independent of the implementation)."""
    out = bytearray()
    i = 0
    while i < len(data):
        c = data[i : i + 1]
        if c == b"\r" and data[i + 1 : i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        out += b"\r\n" if c in (b"\r", b"\n") else c
        i += 1
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return bytes(out)


def _oracle_unstuff(wire: bytes) -> bytes:
    """Split the wire form into lines and undo stuffing line by line."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2] == b"."
    body = [line[1:] if line.startswith(b".") else line for line in lines[:-2]]
    return b"".join(line + b"\r\n" for line in body)


def test_encode_data_property_random_bytes(fast_impl: FastImpl) -> None:
    rng = random.Random(20240511)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\x00", b"\xff"]
    for _ in range(3000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        wire = fast_impl.encode_data(message)
        # No CR or LF outside a CRLF pair.
        assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
        # The end-of-data line appears exactly once, at the very end.
        assert wire == b".\r\n" or wire.find(b"\r\n.\r\n") == len(wire) - 5
        assert not re.search(rb"(?:^|\r\n)\.(?!\.)[^\r]", wire)  # every dot-led line is stuffed
        assert _oracle_unstuff(wire) == _oracle_normalise(message)
        assert decode_data(wire) == _oracle_normalise(message)


def test_encode_data_large_body_with_bare_lf(fast_impl: FastImpl) -> None:
    body = b"line\n.dot\n" * 200_000  # 2 MB
    wire = fast_impl.encode_data(body)
    assert wire.count(b"\r\n..dot\r\n") == 200_000
    assert len(wire) == len(body) + 200_000 * 3 + 3


def test_decode_data_rejects_unterminated_payload() -> None:
    with pytest.raises(ValueError, match="does not end"):
        decode_data(b"abc\r\n")
    with pytest.raises(ValueError, match=r"CRLF\.CRLF"):
        decode_data(b"abc.\r\n")


def test_encode_data_benchmark(benchmark: BenchmarkFixture, fast_impl: FastImpl) -> None:
    body = (b"x" * 76 + b"\n.dot\n") * 10_000  # about 800 KB with bare LFs and dots
    wire = benchmark(encode_data, body)
    assert wire.endswith(b"\r\n.\r\n")


@pytest.mark.parametrize(
    ("addr", "kwargs", "reason"),
    [
        ("", {}, "recipient: empty address"),
        ("user@exa mple.com", {}, "contains a space"),
        ("<user@example.com>", {}, "contains an angle bracket"),
        ("user\r\n@example.com", {}, r"control character '\\r'"),
        ("us\ner@example.com", {}, r"control character '\\n'"),
        ("user\x00@example.com", {}, r"control character '\\x00'"),
        ("user\x7f@example.com", {}, r"control character '\\x7f'"),
        ("user.example.com", {}, "missing '@'"),
        ("@example.com", {}, "empty local part"),
        ("user@", {}, "empty domain"),
        ("a@b@example.com", {}, "more than one '@'"),
        ("l" * 65 + "@example.com", {}, "local part longer than 64 octets"),
        ("l" * 64 + "@" + ("d" * 60 + ".") * 3 + "d" * 9 + ".com", {}, "longer than 254"),
        ("user@-bad.example", {}, "invalid domain label '-bad'"),
        ("user@bad-.example", {}, "invalid domain label 'bad-'"),
        ("user@bad_label.example", {}, "invalid domain label 'bad_label'"),
        ("user@example..com", {}, "empty label"),
        ("user@example.com.", {}, "empty label"),
        ("user@[127.0.0]", {}, "invalid address literal"),
        ("user@[IPv6:::g]", {}, "invalid address literal"),
        ("user@[127.0.0.1", {}, "unterminated address literal"),
        ("user@exämple-.com", {}, "invalid internationalized domain"),
        ("bad user@example.com", {"where": "sender"}, r"^sender 'bad user@example.com'"),
    ],
)
def test_validate_address_errors(addr: str, kwargs: dict[str, str], reason: str) -> None:
    with pytest.raises(InjectionError, match=reason) as info:
        validate_address(addr, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "addr",
    [
        "user@example.com",
        "first.last+tag@mail.sub.example.co",
        "user@localhost",
        "user@[127.0.0.1]",
        "user@[IPv6:::1]",
        "user@[ipv6:2001:db8::1]",
        '"a@b"@example.com',
        "l" * 64 + "@example.com",
    ],
)
def test_validate_address_accepts(addr: str) -> None:
    assert validate_address(addr) == addr


def test_validate_address_null_reverse_path_only_when_allowed() -> None:
    assert validate_address("", allow_empty=True, where="sender") == ""
    with pytest.raises(InjectionError, match="sender: empty address"):
        validate_address("", where="sender")


def test_domain_of_lowercases() -> None:
    assert domain_of("User@Mail.Example.COM") == "mail.example.com"
    assert domain_of('"a@b"@Example.org') == "example.org"


def test_wire_address_checks_only_what_breaks_the_command() -> None:
    assert wire_address("x@y") == b"x@y"
    for bad in ("x@y\r\nRSET", "x y@z", "x>@y", "x\t@y"):
        with pytest.raises(InjectionError, match="not allowed on the wire"):
            wire_address(bad)
    with pytest.raises(InjectionError, match="SMTPUTF8"):
        wire_address("ü@y", where="sender")


def test_encode_data_twins_agree_on_random_bytes() -> None:
    from kumopy._fast import _wire_py

    twins = [_wire_py.encode_data]
    if not no_extensions():
        from kumopy._fast._wire_c import encode_data as c_encode_data

        twins.append(c_encode_data)
    rng = random.Random(77)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\x00", b"\xff", b"xyz" * 30]
    for _ in range(5000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        wire = _wire_py.encode_data(message)
        for twin in twins:
            assert twin(message) == wire and twin(memoryview(message)) == wire
    assert encode_data is twins[-1]  # kumopy.smtp.wire uses the compiled twin when built


# -- the 998-octet line limit --------------------------------------------------------------------

_LINE_ERROR = "RFC 5322 allows at most 998 (not counting the line ending)"


@pytest.mark.parametrize("end", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
@pytest.mark.parametrize("view", [False, True], ids=["bytes", "memoryview"])
def test_line_of_998_octets_passes_and_999_is_refused(end: bytes, view: bool) -> None:
    def body(n: int) -> bytes | memoryview:
        data = b"Subject: x" + end + end + b"a" * 998 + end + b"b" * n + end + b"tail"
        return memoryview(data) if view else data

    check_line_length(body(998))
    with pytest.raises(InjectionError) as info:
        check_line_length(body(999))
    message = str(info.value)
    assert "message line 4 is 999 octets long" in message and _LINE_ERROR in message
    assert "quoted-printable or base64" in message


@pytest.mark.parametrize(
    ("data", "line", "length"),
    [
        (b"x" * 999, 1, 999),
        (b"x" * 5000 + b"\r\n", 1, 5000),
        (b"a\r\nb\r\n" + b"x" * 999, 3, 999),  # the last line needs no ending
        (b"a\n\r" + b"x" * 1500, 3, 1500),  # LF then CR: two line endings
        (b"a\r\r\n" + b"x" * 999, 3, 999),  # CR then CRLF: two line endings
        (b"\r\n" * 3 + b"x" * 998 + b"\r" + b"y" * 999, 5, 999),  # a bare CR splits a line
        (b"x" * 998 + b"\r\n" + b"y" * 998 + b"\n" + b"z" * 1_000_000, 3, 1_000_000),
    ],
)
def test_long_line_error_names_line_and_length(data: bytes, line: int, length: int) -> None:
    with pytest.raises(InjectionError, match=f"message line {line} is {length} octets long"):
        check_line_length(memoryview(data))


def test_short_lines_pass() -> None:
    check_line_length(b"")
    check_line_length(b"x" * 998)
    check_line_length((b"x" * 998 + b"\r\n") * 2000)
    check_line_length((b"x" * 998 + b"\r") * 2000)
    check_line_length(b"\r\n" * 10_000 + b"\n\r" * 10_000)


def test_line_length_agrees_with_the_line_endings_encode_data_writes() -> None:
    rng = random.Random(998)
    alphabet = [b"x" * 400, b"x" * 599, b"x", b"\r", b"\n", b"\r\n", b"\n\r"]
    refused = 0
    for _ in range(3000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        lines = _oracle_normalise(data).split(b"\r\n")
        too_long = [(n, len(x)) for n, x in enumerate(lines, start=1) if len(x) > 998]
        if not too_long:
            check_line_length(data)
            continue
        refused += 1
        line, length = too_long[0]
        with pytest.raises(InjectionError, match=f"message line {line} is {length} octets"):
            check_line_length(memoryview(data))
    assert refused > 300


def test_check_line_length_benchmark_on_998_octet_lines(benchmark: BenchmarkFixture) -> None:
    # The worst case for a naive search (quadratic per line); this one stays linear.
    body = (b"x" * 998 + b"\r\n") * 4000 + (b"y" * 500 + b"\n") * 8000  # 8 MB
    benchmark(check_line_length, memoryview(body))


def test_check_line_length_benchmark(benchmark: BenchmarkFixture) -> None:
    body = (b"The quick brown fox jumps over the lazy dog, message body line.\r\n") * 16_000
    benchmark(check_line_length, memoryview(body))  # about 1 MB


def test_validate_address_benchmark(benchmark: BenchmarkFixture) -> None:
    addrs = [f"first.last+{i}@mail{i % 7}.example.com" for i in range(1000)]

    def run() -> None:
        for addr in addrs:
            validate_address(addr)

    benchmark(run)


def test_long_line_at_twins_agree_with_a_plain_scan() -> None:
    from kumopy._fast import _wire_py, long_line_at

    twins = [_wire_py.long_line_at]
    if not no_extensions():
        from kumopy._fast._wire_c import long_line_at as c_long_line_at

        twins.append(c_long_line_at)
        assert long_line_at is c_long_line_at  # production uses the compiled twin when built

    def plain(data: bytes, limit: int) -> int:
        run = 0
        for i, octet in enumerate(data):
            run = 0 if octet in b"\r\n" else run + 1
            if run > limit:
                return i - limit
        return -1

    rng = random.Random(998)
    pieces = [b"a", b"\r", b"\n", b"\r\n", b"x" * 7, b"y" * 13]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        limit = rng.randrange(0, 25)
        want = plain(data, limit)
        for twin in twins:
            assert twin(data, limit) == want, (data, limit)
            assert twin(memoryview(data), limit) == want
