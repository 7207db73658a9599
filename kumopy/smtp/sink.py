"""An SMTP sink for tests, demos and benchmarks, with scripted answers by recipient local part.

Recipients whose local part starts with one of these prefixes get a scripted answer:

  tempfail-once-...  451 4.3.0 on the first RCPT of that address, then 250
  tempfail-...       451 4.3.0 on every RCPT
  reject-...         550 5.1.1 at RCPT
  datafail-...       accepted at RCPT; the transaction gets 451 4.3.0 after the final dot
  slow-...           accepted; the reply after the final dot comes only after --slow-delay seconds
Everything else is accepted with 250.

It announces PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES and answers a pipelined group
with one write. With --record, every message (final dot) becomes one JSON line, flushed at
least every 100 ms: conn, seq, time, peer_ip, peer_port, local_ip, local_port, helo, mail_from,
rcpt_to (accepted ones), size, bare_lf_or_cr, code (the final reply), pipelined (MAIL to DATA
arrived in one read); with --raw also raw (the DATA bytes as received, up to and including the
final dot line) and data (dot-unstuffed), both base64-encoded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import uvloop

from kumopy.smtp.wire import decode_data

__all__ = [
    "Sink",
    "SinkOptions",
    "main",
    "parse_listen",
    "record_from_json",
    "record_to_json",
]

Record = dict[str, Any]

_MAX_LINE = 4096
_FLUSH_INTERVAL = 0.1
_TERM = b"\r\n.\r\n"
_BYTES_FIELDS = ("raw", "data")
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
    hostname: str = "sink.kumopy.invalid"
    """Name used in the greeting and EHLO reply."""


@dataclass(slots=True)
class _State:
    """What all connections of one sink share."""

    options: SinkOptions
    on_record: Callable[[Record], None] | None
    tempfail_seen: set[str] = field(default_factory=set)
    connections: int = 0
    messages: int = 0
    protocols: set[_SinkProtocol] = field(default_factory=set)


def _scripted(rcpt: str, state: _State) -> bytes | None:
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


class _SinkProtocol(asyncio.Protocol):
    """One SMTP server session of the sink."""

    def __init__(self, state: _State) -> None:
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
            return self._mail(arg), False
        if verb == "DATA":
            return self._data(), False
        if verb in ("EHLO", "HELO"):
            return self._hello(verb, arg.strip()), False
        if verb == "RSET":
            self._reset()
        return _SIMPLE.get(verb, b"500 5.5.2 Command not recognized\r\n"), verb == "QUIT"

    def _reset(self) -> None:
        """Forget the current transaction."""
        self.mail_from = None
        self.rcpts = []
        self.datafail = False
        self.slow = False

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
        lines += [b"250-8BITMIME", b"250-SIZE %d" % self.opts.max_size]
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
        self.rcpts.append(rcpt)
        return b"250 2.1.5 OK\r\n"

    def _data(self) -> bytes:
        """Answer DATA: go into data mode when there is a valid recipient."""
        if self.mail_from is None:
            return b"503 5.5.1 Need MAIL command\r\n"
        if not self.rcpts:
            return b"554 5.5.1 No valid recipients\r\n"
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


def record_to_json(record: Record) -> str:
    """Return one record as a JSON line, bytes base64-encoded."""
    out = {
        k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
        for k, v in record.items()
    }
    return json.dumps(out, separators=(",", ":"))


def record_from_json(line: str) -> Record:
    """Parse one JSON line written by the sink, decoding the raw and data fields to bytes."""
    record: Record = json.loads(line)
    for key in _BYTES_FIELDS:
        if isinstance(record.get(key), str):
            record[key] = base64.b64decode(record[key])
    return record


def _resolve(fut: asyncio.Future[None]) -> None:
    """Complete a stop future unless already done."""
    if not fut.done():
        fut.set_result(None)


class Sink:
    """An in-process sink serving from a background thread with its own event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        options: SinkOptions | None = None,
        record_file: str | Path | None = None,
        keep_records: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options or SinkOptions()
        self.records: list[Record] = []
        """Every finished message, in order (bytes values as bytes)."""
        self._record_file = record_file
        self._keep = keep_records
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._state: _State | None = None
        self._error: BaseException | None = None

    @property
    def connections(self) -> int:
        """Return how many connections the sink has accepted."""
        return self._state.connections if self._state else 0

    @property
    def open_connections(self) -> int:
        """Return how many sessions are open right now."""
        return len(self._state.protocols) if self._state else 0

    @property
    def messages(self) -> int:
        """Return how many messages (final dots) the sink has seen."""
        return self._state.messages if self._state else 0

    def start(self) -> Sink:
        """Start serving in a background thread; return once listening."""
        if self._thread is not None:
            raise RuntimeError("Sink.start() called twice")
        self._thread = threading.Thread(target=self._run, name="kumopy-sink", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _record(self, record: Record) -> None:
        """Keep a record and wake wait_for()."""
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def _run(self) -> None:
        """Thread body: serve until stop()."""
        loop = self._loop = uvloop.new_event_loop()
        self._stop = loop.create_future()
        try:
            loop.run_until_complete(
                _serve(
                    self.host,
                    self.port,
                    self.options,
                    self._stop,
                    record_file=self._record_file,
                    on_record=self._record if self._keep else None,
                    on_ready=self._on_ready,
                )
            )
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                raise
        finally:
            loop.close()

    def _on_ready(self, bound: tuple[str, int], state: _State) -> None:
        """Note the bound port and let start() return."""
        self.port = bound[1]
        self._state = state
        self._ready.set()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Record]:
        """Wait until at least n records exist; return them or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.records) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink has {len(self.records)} records, wanted {n}")
                self._cond.wait(left)
            return list(self.records)

    def stop(self) -> None:
        """Stop serving, close every session and join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, stop)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Sink:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_listen(value: str) -> tuple[str, int]:
    """Parse "host:port", "[v6]:port" or "v6:port" into (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m kumopy.smtp.sink",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 2525),
        help="HOST:PORT ([::1]:0 for IPv6); port 0 picks a free one (default 127.0.0.1:2525)",
    )
    p.add_argument("--record", metavar="FILE.jsonl", help="append one JSON line per message")
    p.add_argument(
        "--raw", action="store_true", help="record raw DATA bytes and decoded message (base64)"
    )
    p.add_argument("--port-file", metavar="FILE", help="write the bound port here once listening")
    p.add_argument("--greeting-code", type=int, default=220, help="greet with this code")
    p.add_argument("--greeting-delay", type=float, default=0.0, help="seconds before greeting")
    p.add_argument("--slow-delay", type=float, default=2.0, help="final-reply delay for slow-")
    p.add_argument("--max-size", type=int, default=52_428_800, help="SIZE limit in bytes")
    p.add_argument(
        "--no-pipelining", action="store_true", help="do not announce PIPELINING in EHLO"
    )
    return p


async def _serve(
    host: str,
    port: int,
    options: SinkOptions,
    stop: asyncio.Future[None],
    *,
    record_file: str | Path | None = None,
    on_record: Callable[[Record], None] | None = None,
    on_ready: Callable[[tuple[str, int], _State], None] | None = None,
) -> _State:
    """Serve on host:port until stop completes, then close every session and flush records."""
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        sinks = [on_record] if on_record is not None else []
        lines: list[str] = []
        if record_file is not None:
            fh = stack.enter_context(open(record_file, "a", encoding="utf-8"))

            def flush() -> None:
                if lines:
                    fh.write("".join(lines))
                    lines.clear()
                    fh.flush()

            def to_file(rec: Record) -> None:
                # The first line of a batch schedules its flush: at most 100 ms on the way.
                if not lines:
                    loop.call_later(_FLUSH_INTERVAL, flush)
                lines.append(record_to_json(rec) + "\n")

            sinks.append(to_file)
            stack.callback(flush)

        def record(rec: Record) -> None:
            for f in sinks:
                f(rec)

        state = _State(options, record if sinks else None)
        server = await loop.create_server(lambda: _SinkProtocol(state), host, port, backlog=512)
        try:
            if on_ready is not None:
                bound = server.sockets[0].getsockname()
                on_ready((str(bound[0]), int(bound[1])), state)
            await stop
        finally:
            server.close()
            for proto in list(state.protocols):
                if proto.transport is not None:
                    proto.transport.abort()
            await server.wait_closed()
            # Let aborted transports run connection_lost before the loop closes.
            for _ in range(3):
                await asyncio.sleep(0)
    return state


async def _main_async(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM."""
    host, port = args.listen
    options = SinkOptions(
        raw=args.raw,
        greeting_code=args.greeting_code,
        greeting_delay=args.greeting_delay,
        slow_delay=args.slow_delay,
        max_size=args.max_size,
        pipelining=not args.no_pipelining,
    )
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _resolve, stop)

    def ready(bound: tuple[str, int], state: _State) -> None:
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(f"{bound[1]}\n")
            tmp.replace(args.port_file)
        print(f"kumopy sink listening on {bound[0]}:{bound[1]}", flush=True)

    state = await _serve(host, port, options, stop, record_file=args.record, on_ready=ready)
    print(
        f"kumopy sink: {state.connections} connections, {state.messages} messages", file=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sink from the command line."""
    args = _parser().parse_args(argv)
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(_main_async(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
