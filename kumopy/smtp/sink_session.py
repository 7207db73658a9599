"""The sink's SMTP server session: one asyncio protocol per connection, and the options it obeys.

kumopy.smtp.sink wraps this in a server loop, a threaded Sink for tests and the command line;
its docstring describes the scripted answers and the record fields this module produces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kumopy.smtp.wire import decode_data

__all__ = ["Record", "SinkOptions", "SinkProtocol", "SinkState"]

Record = dict[str, Any]
"""One finished message as the sink reports it (bytes values as bytes)."""

_MAX_LINE = 4096
_TERM = b"\r\n.\r\n"
_SIMPLE = {
    "RSET": b"250 2.0.0 OK\r\n",
    "NOOP": b"250 2.0.0 OK\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
    "VRFY": b"252 2.1.5 Cannot VRFY user, but will accept message\r\n",
}


@dataclass(frozen=True, slots=True)
class SinkOptions:
    """How the sink behaves."""

    raw: bool = False
    """Keep the raw DATA bytes and the decoded message in each record."""
    greeting_code: int = 220
    """Code of the greeting; anything but 220 is sent and the connection closed."""
    greeting_delay: float = 0.0
    """Seconds to wait before the greeting."""
    slow_delay: float = 2.0
    """Delay of the final reply for a transaction with a slow- recipient."""
    max_size: int = 52_428_800
    """SIZE announced in EHLO and enforced after DATA."""
    pipelining: bool = True
    """Announce PIPELINING."""
    eightbitmime: bool = True
    """Announce 8BITMIME."""
    hostname: str = "sink.kumopy.invalid"
    """Name used in the greeting and EHLO reply."""
    refuse_from: tuple[str, ...] = ()
    """Client addresses whose MAIL FROM gets refuse_reply (a receiver pushing back on an IP)."""
    refuse_reply: bytes = b"421 4.7.0 rate limited, try again later"
    """The refusal; a 421 also closes the connection, as receivers do."""
    refuse_count: int = 0
    """Refuse only the first N MAIL FROMs of each such address (0: all of them)."""


@dataclass(slots=True)
class SinkState:
    """What all connections of one sink share."""

    options: SinkOptions
    on_record: Callable[[Record], None] | None
    """Called with every finished message; None skips building records at all."""
    tempfail_seen: set[str] = field(default_factory=set)
    """tempfail-once- addresses already deferred once (lowercased)."""
    refused: dict[str, int] = field(default_factory=dict)
    """MAIL FROMs refused so far per client address (refuse_from)."""
    connections: int = 0
    """Connections accepted so far."""
    messages: int = 0
    """Messages (final dots) seen so far."""
    protocols: set[SinkProtocol] = field(default_factory=set)
    """Sessions open right now."""
    peak: int = 0
    """The most sessions open at once so far."""


def _scripted(rcpt: str, state: SinkState) -> bytes | None:
    """Return the scripted RCPT reply for a recipient, or None to accept it."""
    local = rcpt.rpartition("@")[0].lower()
    if local.startswith("tempfail-once-"):
        key = rcpt.lower()
        if key in state.tempfail_seen:
            return None
        state.tempfail_seen.add(key)
        return b"451 4.3.0 Temporary failure, try again later (first attempt deferred)\r\n"
    if local.startswith("tempfail-"):
        return b"451 4.3.0 Temporary failure, try again later\r\n"
    if local.startswith("reject-"):
        return b"550 5.1.1 <" + rcpt.encode() + b">: Recipient address rejected: User unknown\r\n"
    return None


def _has_bare_cr_or_lf(raw: bytes) -> bool:
    """Return True when raw holds a CR or LF that is not part of a CRLF pair."""
    crlf = raw.count(b"\r\n")
    return raw.count(b"\r") != crlf or raw.count(b"\n") != crlf


class SinkProtocol(asyncio.Protocol):
    """One SMTP server session of the sink."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.opts = state.options
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.held = True
        self.in_data = False
        self.scan = 0
        self.helo: str | None = None
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.datafail = False
        self.slow = False
        self.data250 = False
        self.chunks = 0
        self.mail_chunk = -1
        self.pipelined = False
        self.conn_id = 0
        self.seq = 0
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client, now or after the configured delay."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections += 1
        self.conn_id = self.state.connections
        self.state.protocols.add(self)
        self.state.peak = max(self.state.peak, len(self.state.protocols))
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(local[0]), int(local[1]))
        if self.opts.greeting_delay > 0:
            asyncio.get_running_loop().call_later(self.opts.greeting_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        """Send the greeting; a non-220 greeting also closes the connection."""
        t = self.transport
        if t is None or t.is_closing():
            return
        code = self.opts.greeting_code
        if code != 220:
            host = self.opts.hostname.encode()
            t.write(
                b"%d %d.3.2 %s service not available, closing channel\r\n"
                % (code, code // 100, host)
            )
            t.close()
            return
        t.write(b"220 " + self.opts.hostname.encode() + b" ESMTP kumopy sink ready\r\n")
        self.held = False
        if self.buf:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session."""
        self.state.protocols.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Buffer input and answer every complete command or message in it."""
        self.buf += data
        self.chunks += 1
        if not self.held:
            self._process()

    def _process(self) -> None:
        """Handle buffered input until more is needed; write all replies at once (pipelining)."""
        buf = self.buf
        out: list[bytes] = []
        pos = 0
        close = False
        while not self.held and self.transport is not None:
            if self.in_data:
                end = self._find_end(pos)
                if end < 0:
                    break
                raw = bytes(buf[pos:end])
                pos = end
                self.in_data = False
                slow = self.slow
                reply = self._message(raw)
                if slow:
                    self.held = True
                    asyncio.get_running_loop().call_later(
                        self.opts.slow_delay, self._release, reply
                    )
                else:
                    out.append(reply)
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > _MAX_LINE:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    close = True
                break
            line = bytes(buf[pos : nl + 1])
            pos = nl + 1
            reply, close = self._command(line)
            out.append(reply)
            if close:
                break
            if self.in_data:
                self.scan = pos
        if pos:
            del buf[:pos]
            self.scan = max(0, self.scan - pos)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if close and self.transport is not None:
            self.transport.close()

    def _find_end(self, pos: int) -> int:
        """Return the index just past the final ".\\r\\n" of the message at pos, or -1."""
        buf = self.buf
        if buf[pos : pos + 3] == b".\r\n":
            return pos + 3
        start = max(pos, self.scan - 4)
        i = buf.find(_TERM, start)
        if i < 0:
            self.scan = len(buf)
            return -1
        return i + len(_TERM)

    def _release(self, reply: bytes) -> None:
        """Send a delayed final reply and resume reading."""
        if self.transport is None:
            return
        self.transport.write(reply)
        self.held = False
        if self.buf:
            self._process()

    def _command(self, line: bytes) -> tuple[bytes, bool]:
        """Answer one command line; return the reply and whether to close afterwards."""
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "RCPT":
            return self._rcpt(arg), False
        if verb == "MAIL":
            if self.peer[0] in self.opts.refuse_from and self._refuse():
                reply = self.opts.refuse_reply
                return reply.rstrip(b"\r\n") + b"\r\n", reply.startswith(b"421")
            return self._mail(arg), False
        if verb == "DATA":
            return self._data(), False
        if verb in ("EHLO", "HELO"):
            return self._hello(verb, arg.strip()), False
        if verb == "RSET":
            self._reset()
        return _SIMPLE.get(verb, b"500 5.5.2 Command not recognized\r\n"), verb == "QUIT"

    def _refuse(self) -> bool:
        """Count one refusal for this client; return False once its count is used up."""
        seen = self.state.refused.get(self.peer[0], 0)
        if self.opts.refuse_count and seen >= self.opts.refuse_count:
            return False
        self.state.refused[self.peer[0]] = seen + 1
        return True

    def _reset(self) -> None:
        """Forget the current transaction."""
        self.mail_from = None
        self.rcpts = []
        self.datafail = False
        self.slow = False
        self.data250 = False

    def _hello(self, verb: str, name: str) -> bytes:
        """Answer EHLO or HELO."""
        if not name:
            return b"501 5.5.4 Syntax: %s hostname\r\n" % verb.encode()
        self.helo = name
        self._reset()
        host = self.opts.hostname.encode()
        if verb == "HELO":
            return b"250 " + host + b"\r\n"
        lines = [b"250-" + host + b" hello " + name.encode()]
        if self.opts.pipelining:
            lines.append(b"250-PIPELINING")
        if self.opts.eightbitmime:
            lines.append(b"250-8BITMIME")
        lines.append(b"250-SIZE %d" % self.opts.max_size)
        lines.append(b"250 ENHANCEDSTATUSCODES")
        return b"\r\n".join(lines) + b"\r\n"

    @staticmethod
    def _path(arg: str, keyword: str) -> tuple[str, str] | None:
        """Split "FROM:<addr> params" into (addr, params), or None when malformed."""
        if arg[: len(keyword)].upper() != keyword:
            return None
        rest = arg[len(keyword) :].lstrip()
        if not rest.startswith("<"):
            return None
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end], rest[end + 1 :].strip()

    def _mail(self, arg: str) -> bytes:
        """Answer MAIL FROM."""
        if self.helo is None:
            return b"503 5.5.1 Send EHLO first\r\n"
        if self.mail_from is not None:
            return b"503 5.5.1 Nested MAIL command\r\n"
        parsed = self._path(arg, "FROM:")
        if parsed is None:
            return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        addr, params = parsed
        for param in params.split():
            key, _, value = param.partition("=")
            if key.upper() == "SIZE" and value.isdigit() and int(value) > self.opts.max_size:
                return b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        self.mail_from = addr
        self.mail_chunk = self.chunks
        return b"250 2.1.0 OK\r\n"

    def _rcpt(self, arg: str) -> bytes:
        """Answer RCPT TO, applying the scripted answers."""
        if self.mail_from is None:
            return b"503 5.5.1 Need MAIL before RCPT\r\n"
        parsed = self._path(arg, "TO:")
        if parsed is None or "@" not in parsed[0]:
            return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
        rcpt = parsed[0]
        scripted = _scripted(rcpt, self.state)
        if scripted is not None:
            return scripted
        local = rcpt.rpartition("@")[0].lower()
        if local.startswith("datafail-"):
            self.datafail = True
        elif local.startswith("slow-"):
            self.slow = True
        elif local.startswith("data250-"):
            self.data250 = True
        self.rcpts.append(rcpt)
        if local.startswith("extrareply-"):
            # A broken server: one reply more than commands, so later replies shift by one.
            return b"250 2.1.5 OK\r\n250 2.1.5 OK (one reply too many)\r\n"
        return b"250 2.1.5 OK\r\n"

    def _data(self) -> bytes:
        """Answer DATA: go into data mode when there is a valid recipient."""
        if self.mail_from is None:
            return b"503 5.5.1 Need MAIL command\r\n"
        if not self.rcpts:
            return b"554 5.5.1 No valid recipients\r\n"
        if self.data250:
            # A broken server: it answers DATA as if the message were taken, and wants no body.
            self._reset()
            return b"250 2.0.0 OK (DATA answered without 354)\r\n"
        self.in_data = True
        # MAIL, RCPT and DATA in one read means the client pipelined them (RFC 2920).
        self.pipelined = self.chunks == self.mail_chunk
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def _message(self, raw: bytes) -> bytes:
        """Finish one message: decide the final reply and record it."""
        self.seq += 1
        self.state.messages += 1
        if len(raw) - 3 > self.opts.max_size:
            reply = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        elif self.datafail:
            reply = b"451 4.3.0 Message deferred after DATA, try again later\r\n"
        else:
            reply = b"250 2.0.0 OK queued as %d.%d\r\n" % (self.conn_id, self.seq)
        on_record = self.state.on_record
        if on_record is not None:
            decoded = decode_data(raw)
            record: Record = {
                "conn": self.conn_id,
                "seq": self.seq,
                "time": time.time(),
                "peer_ip": self.peer[0],
                "peer_port": self.peer[1],
                "local_ip": self.local[0],
                "local_port": self.local[1],
                "helo": self.helo,
                "mail_from": self.mail_from,
                "rcpt_to": list(self.rcpts),
                "size": len(decoded),
                "bare_lf_or_cr": _has_bare_cr_or_lf(raw),
                "code": int(reply[:3]),
                "pipelined": self.pipelined,
            }
            if self.opts.raw:
                record["raw"] = raw
                record["data"] = decoded
            on_record(record)
        self._reset()
        return reply
