"""An SMTP sink for tests, demos and benchmarks, with scripted answers by recipient local part.

Recipients whose local part starts with one of these prefixes get a scripted answer:

  tempfail-once-...  451 4.3.0 on the first RCPT of that address, then 250
  tempfail-...       451 4.3.0 on every RCPT
  reject-...         550 5.1.1 at RCPT
  datafail-...       accepted at RCPT; the transaction gets 451 4.3.0 after the final dot
  slow-...           accepted; the reply after the final dot comes only after --slow-delay seconds
  data250-...        accepted; DATA is answered with 250 instead of 354 (a broken server)
  extrareply-...     accepted with two replies instead of one (a broken server)
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
from pathlib import Path

import uvloop

from kumopy.smtp.sink_session import Record, SinkOptions, SinkProtocol, SinkState

__all__ = [
    "Sink",
    "SinkOptions",
    "main",
    "parse_listen",
    "record_from_json",
    "record_to_json",
]

_FLUSH_INTERVAL = 0.1
_BYTES_FIELDS = ("raw", "data")


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
        self._state: SinkState | None = None
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
    def peak_connections(self) -> int:
        """Return the most sessions that were open at once."""
        return self._state.peak if self._state else 0

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

    def _on_ready(self, bound: tuple[str, int], state: SinkState) -> None:
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


def _parser(prog: str) -> argparse.ArgumentParser:
    """Build the command-line parser."""
    p = argparse.ArgumentParser(
        prog=prog,
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
    p.add_argument("--no-8bitmime", action="store_true", help="do not announce 8BITMIME in EHLO")
    p.add_argument(
        "--refuse-from",
        action="append",
        metavar="IP",
        help="answer MAIL FROM from this client address with --refuse-reply (repeatable)",
    )
    p.add_argument(
        "--refuse-reply",
        default="421 4.7.0 rate limited, try again later",
        help="the refusal (a 421 also closes the connection)",
    )
    p.add_argument(
        "--refuse-count", type=int, default=0, help="refuse only the first N (0: every one)"
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
    on_ready: Callable[[tuple[str, int], SinkState], None] | None = None,
) -> SinkState:
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

        state = SinkState(options, record if sinks else None)
        server = await loop.create_server(lambda: SinkProtocol(state), host, port, backlog=512)
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
        eightbitmime=not args.no_8bitmime,
        refuse_from=tuple(args.refuse_from or ()),
        refuse_reply=args.refuse_reply.encode(),
        refuse_count=args.refuse_count,
    )
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _resolve, stop)

    def ready(bound: tuple[str, int], state: SinkState) -> None:
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(f"{bound[1]}\n")
            tmp.replace(args.port_file)
        print(f"kumopy sink listening on {bound[0]}:{bound[1]}", flush=True)

    state = await _serve(host, port, options, stop, record_file=args.record, on_ready=ready)
    print(
        f"kumopy sink: {state.connections} connections, {state.messages} messages", file=sys.stderr
    )


def main(argv: Sequence[str] | None = None, prog: str = "kumopy sink") -> int:
    """Run the sink from the command line; `prog` names the command in usage and errors."""
    args = _parser(prog).parse_args(argv)
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(_main_async(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m kumopy.smtp.sink"))
