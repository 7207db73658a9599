"""Our SMTP sink: scripted answers, pipelining, recording (in memory and to a file), the CLI."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumopy.smtp.sink import Sink, SinkOptions, parse_listen, record_from_json
from tests.smtp_peer import ROOT, SinkProcess, poll, running_sink


class RawClient:
    """A bare socket speaking SMTP byte for byte, to drive the sink exactly."""

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """Return the next complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed, partial {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def codes(self, n: int) -> list[int]:
        return [int(self.reply()[:3]) for _ in range(n)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    with running_sink(raw=True, slow_delay=0.3) as s:
        yield s


@pytest.fixture
def client(sink: Sink) -> Iterator[RawClient]:
    c = RawClient("127.0.0.1", sink.port, source="127.0.0.5")
    assert c.reply().startswith(b"220 ")
    c.send(b"EHLO raw.test\r\n")
    ehlo = c.reply()
    for ext in (b"PIPELINING", b"8BITMIME", b"SIZE 52428800", b"ENHANCEDSTATUSCODES"):
        assert b"250-" + ext in ehlo or b"250 " + ext in ehlo
    yield c
    c.close()


def test_scripted_answers_in_one_pipelined_group(sink: Sink, client: RawClient) -> None:
    client.send(
        b"MAIL FROM:<s@example.com>\r\n"
        b"RCPT TO:<ok@example.net>\r\n"
        b"RCPT TO:<reject-1@example.net>\r\n"
        b"RCPT TO:<tempfail-1@example.net>\r\n"
        b"RCPT TO:<tempfail-once-1@example.net>\r\n"
        b"DATA\r\n"
    )
    replies = [client.reply() for _ in range(6)]
    assert [r[:9] for r in replies] == [
        b"250 2.1.0",
        b"250 2.1.5",
        b"550 5.1.1",
        b"451 4.3.0",
        b"451 4.3.0",
        b"354 End d",
    ]
    client.send(b"hello\r\n.\r\n")
    assert client.reply().startswith(b"250 2.0.0")
    # tempfail-once remembers the address: the second try is accepted; tempfail- never is.
    client.send(
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<tempfail-once-1@example.net>\r\n"
        b"RCPT TO:<tempfail-1@example.net>\r\nDATA\r\n"
    )
    assert client.codes(4) == [250, 250, 451, 354]
    client.send(b"again\r\n.\r\n")
    assert client.codes(1) == [250]
    first, second = sink.wait_for(2)
    assert first["rcpt_to"] == ["ok@example.net"]
    assert second["rcpt_to"] == ["tempfail-once-1@example.net"]
    assert first["pipelined"] is True
    assert first["peer_ip"] == "127.0.0.5" and first["helo"] == "raw.test"
    assert first["local_port"] == sink.port and first["conn"] == second["conn"] == 1
    assert (first["seq"], second["seq"]) == (1, 2)


def test_datafail_fails_the_whole_transaction_after_the_dot(sink: Sink, client: RawClient) -> None:
    client.send(
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<datafail-1@x.test>\r\nDATA\r\n"
    )
    assert client.codes(4) == [250, 250, 250, 354]
    client.send(b"body\r\n.\r\n")
    assert client.reply().startswith(b"451 4.3.0")
    (rec,) = sink.wait_for(1)
    assert rec["code"] == 451 and rec["rcpt_to"] == ["a@x.test", "datafail-1@x.test"]


def test_no_valid_recipient_refuses_data(sink: Sink, client: RawClient) -> None:
    client.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<reject-2@x.test>\r\nDATA\r\nRSET\r\n")
    assert client.codes(4) == [250, 550, 554, 250]
    client.send(b"NOOP\r\nQUIT\r\n")
    assert client.codes(2) == [250, 221]
    assert sink.messages == 0


def test_raw_recording_and_bare_line_endings(sink: Sink, client: RawClient) -> None:
    raw_ok = b"Subject: t\r\n\r\n..stuffed\r\nend\r\n.\r\n"
    raw_bare = b"bare\nlf and\rcr\r\n.\r\n"
    for raw in (raw_ok, raw_bare, b".\r\n"):
        client.send(b"MAIL FROM:<>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n")
        assert client.codes(3) == [250, 250, 354]
        client.send(raw)
        assert client.codes(1) == [250]
    ok, bare, empty = sink.wait_for(3)
    assert ok["raw"] == raw_ok and ok["data"] == b"Subject: t\r\n\r\n.stuffed\r\nend\r\n"
    assert ok["bare_lf_or_cr"] is False and ok["size"] == len(ok["data"])
    assert bare["raw"] == raw_bare and bare["bare_lf_or_cr"] is True
    assert empty["data"] == b"" and empty["size"] == 0 and empty["mail_from"] == ""


def test_message_split_across_many_reads(sink: Sink, client: RawClient) -> None:
    client.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n")
    assert client.codes(3) == [250, 250, 354]
    body = b"".join(b"line %d\r\n" % i for i in range(2000)) + b".\r\n"
    for i in range(0, len(body), 7):
        client.send(body[i : i + 7])
    assert client.codes(1) == [250]
    (rec,) = sink.wait_for(1)
    assert rec["raw"] == body and rec["pipelined"] is True


def test_slow_recipient_delays_only_the_final_reply(sink: Sink, client: RawClient) -> None:
    client.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<slow-1@x.test>\r\nDATA\r\n")
    assert client.codes(3) == [250, 250, 354]
    start = time.monotonic()
    client.send(b"x\r\n.\r\nNOOP\r\n")  # NOOP pipelined behind the body must wait its turn
    assert client.codes(2) == [250, 250]
    assert time.monotonic() - start >= 0.25


def test_command_errors(sink: Sink) -> None:
    c = RawClient("127.0.0.1", sink.port)
    try:
        c.reply()
        c.send(b"MAIL FROM:<a@b>\r\nEHLO x\r\nRCPT TO:<a@b>\r\nMAIL FROM:a@b\r\nBOGUS\r\n")
        assert c.codes(5) == [503, 250, 503, 501, 500]
        c.send(b"MAIL FROM:<a@b> SIZE=999999999\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\n")
        assert c.codes(3) == [552, 250, 503]
        c.send(b"X" * 5000)
        assert c.reply().startswith(b"500 5.5.2")
        with pytest.raises(EOFError):
            c.reply()
    finally:
        c.close()


def test_greeting_code_and_delay() -> None:
    with running_sink(greeting_code=421) as s:
        c = RawClient("127.0.0.1", s.port)
        assert c.reply().startswith(b"421 4.3.2")
        with pytest.raises(EOFError):
            c.reply()
        c.close()
    with running_sink(greeting_delay=0.3) as s:
        start = time.monotonic()
        c = RawClient("127.0.0.1", s.port)
        c.send(b"EHLO early\r\n")  # sent before the greeting: answered after it, in order
        assert c.reply().startswith(b"220 ")
        assert c.reply().startswith(b"250-")
        assert time.monotonic() - start >= 0.25
        c.close()


def test_counts_connections_and_serves_ipv6() -> None:
    with running_sink("::1", pipelining=False) as s:
        clients = [RawClient("::1", s.port) for _ in range(3)]
        for c in clients:
            assert c.reply().startswith(b"220")
            c.send(b"EHLO v6\r\n")
            assert b"PIPELINING" not in c.reply()
        c = clients[0]
        c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<r@b.test>\r\nDATA\r\n")
        assert c.codes(3) == [250, 250, 354]
        c.send(b"x\r\n.\r\n")
        assert c.codes(1) == [250]
        (rec,) = s.wait_for(1)
        assert rec["peer_ip"] == "::1" and rec["local_ip"] == "::1"
        assert s.connections == 3
        poll(lambda: s.open_connections == 3)
        for c in clients:
            c.close()
        poll(lambda: s.open_connections == 0)


def test_smtplib_delivers_to_the_sink(sink: Sink) -> None:
    with smtplib.SMTP(
        "127.0.0.1", sink.port, local_hostname="stdlib.test", source_address=("127.0.0.9", 0)
    ) as smtp:
        refused = smtp.sendmail(
            "from@x.test", ["a@y.test", "reject-9@y.test"], b"Subject: s\r\n\r\n.dot\r\n"
        )
    assert list(refused) == ["reject-9@y.test"]
    (rec,) = sink.wait_for(1)
    assert rec["data"] == b"Subject: s\r\n\r\n.dot\r\n" and rec["peer_ip"] == "127.0.0.9"


def test_wait_for_times_out() -> None:
    with running_sink() as s, pytest.raises(TimeoutError, match="0 records, wanted 1"):
        s.wait_for(1, timeout=0.05)


def test_start_reports_bind_errors() -> None:
    with running_sink() as s, pytest.raises(OSError):
        Sink("127.0.0.1", s.port).start()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:2525") == ("::1", 2525)
    assert parse_listen("::1:25") == ("::1", 25)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("localhost")


@pytest.mark.integration
def test_cli_records_to_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = SinkProcess(tmp_path, "--raw", "--no-pipelining")
    try:
        with smtplib.SMTP(
            "127.0.0.1", proc.port, local_hostname="cli.test", source_address=("127.0.0.7", 0)
        ) as smtp:
            smtp.sendmail("a@x.test", ["b@y.test"], "hello\n.world\n")  # str: smtplib fixes EOLs
            # The record is on disk within the 100 ms flush interval, while the sink runs.
            (rec,) = proc.wait_for(1, timeout=5)
    finally:
        code, err = proc.stop()
    assert code == 0 and "1 connections, 1 messages" in err
    assert rec["peer_ip"] == "127.0.0.7" and rec["helo"] == "cli.test"
    assert rec["raw"] == b"hello\r\n..world\r\n.\r\n" and rec["data"] == b"hello\r\n.world\r\n"
    assert rec["pipelined"] is False


@pytest.mark.integration
@pytest.mark.parametrize(
    ("module", "usage"),
    [
        (["kumopy.smtp.sink"], "usage: python -m kumopy.smtp.sink "),
        (["kumopy", "sink"], "usage: kumopy sink "),
    ],
    ids=["module", "subcommand"],
)
def test_cli_help_explains_the_scripted_answers(module: list[str], usage: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", *module, "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=30,
    ).stdout
    assert out.startswith(usage)
    for word in ("tempfail-once-", "datafail-", "slow-", "--port-file", "--greeting-code"):
        assert word in out


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SinkOptions().raw = True  # type: ignore[misc]


def test_in_process_sink_records_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with Sink("127.0.0.1", 0, record_file=path, keep_records=False).start() as s:
        c = RawClient("127.0.0.1", s.port)
        c.reply()
        c.send(b"HELO f.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        assert c.codes(4) == [250, 250, 250, 354]
        c.send(b"x\r\n.\r\n")
        assert c.codes(1) == [250]
        # Flushed by the timer while the sink keeps running, not only at stop().
        poll(lambda: path.exists() and path.read_text().endswith("\n"), timeout=5)
        c.close()
        assert s.records == [] and s.messages == 1
    (line,) = path.read_text().splitlines()
    assert record_from_json(line)["helo"] == "f.test"
