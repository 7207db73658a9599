"""Test helpers: SMTP peers on loopback (our sink, in-process or as a process; aiosmtpd with
and without STARTTLS; a scripted server for what no real one does)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope, Session

from kumopy.harness import wait_for
from kumopy.ipc.jobs import JobResult
from kumopy.smtp.sink import Sink, SinkOptions, record_from_json

__all__ = [
    "PEER_NAME",
    "ROOT",
    "AiosmtpdPeer",
    "Peer",
    "Scripted",
    "Seen",
    "SinkProcess",
    "peers_on_one_port",
    "poll",
    "refusing_port",
    "run_deliverer",
    "running_sink",
]

ROOT = Path(__file__).resolve().parent.parent


def poll(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Wait until predicate() is true, polling; fail the test at the deadline."""
    wait_for(predicate, timeout, "the condition", interval)


@contextlib.contextmanager
def running_sink(host: str = "127.0.0.1", **options: Any) -> Iterator[Sink]:
    """Run our sink in-process on host, port 0, with the given SinkOptions fields."""
    sink = Sink(host, 0, options=SinkOptions(**options)).start()
    try:
        yield sink
    finally:
        sink.stop()


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """Yield a port on host where connections are refused (bound, never listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel a peer thread's remaining tasks, let them finish, and close its loop."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


class SinkProcess:
    """Our sink as a separate process (python -m kumopy.smtp.sink), recording to a file."""

    def __init__(self, tmp: Path, *args: str, listen: str = "127.0.0.1:0") -> None:
        self.record_file = tmp / "records.jsonl"
        port_file = tmp / "port"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "kumopy.smtp.sink", "--listen", listen]
        cmd += ["--port-file", str(port_file), "--record", str(self.record_file), *args]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            poll(lambda: port_file.exists() or self.proc.poll() is not None, timeout=20)
            if not port_file.exists():
                raise AssertionError(f"sink exited early: {self.proc.communicate()[1]}")
        except BaseException:
            self.stop()
            raise
        self.port = int(port_file.read_text())

    def records(self) -> list[dict[str, Any]]:
        """Return the records written so far (complete lines only)."""
        if not self.record_file.exists():
            return []
        text = self.record_file.read_text(encoding="utf-8")
        return [record_from_json(line) for line in text.splitlines(keepends=True) if "\n" in line]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until the record file holds at least n records and return them."""
        poll(lambda: len(self.records()) >= n, timeout=timeout)
        return self.records()

    def stop(self) -> tuple[int, str]:
        """Send SIGTERM to the sink (by PID), wait, and return its exit code and stderr."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@dataclass
class _Received:
    """One message aiosmtpd accepted."""

    peer: tuple[str, int]
    helo: str | None
    mail_from: str | None
    rcpt_tos: list[str]
    content: bytes


@dataclass
class _Handler:
    """aiosmtpd handler: rejects reject-* recipients and blocked* senders, records the rest."""

    received: list[_Received] = field(default_factory=list)
    ehlo_refused: bool = False

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """Refuse EHLO when asked to, so that the client falls back to HELO."""
        if self.ehlo_refused:
            return ["502 5.5.2 EHLO not implemented"]
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Refuse senders whose local part starts with "blocked"."""
        if address.startswith("blocked"):
            return "550 5.7.1 Sender blocked"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Refuse reject-* recipients, accept the others."""
        if address.startswith("reject-"):
            return "550 5.1.1 User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        """Record the message."""
        content = envelope.original_content or b""
        raw_peer: Any = session.peer  # typed as str by aiosmtpd, really a (host, port) tuple
        peer = (str(raw_peer[0]), int(raw_peer[1]))
        self.received.append(
            _Received(peer, session.host_name, envelope.mail_from, list(envelope.rcpt_tos), content)
        )
        return "250 2.0.0 Message accepted"


class AiosmtpdPeer:
    """aiosmtpd's SMTP server (a real third-party peer, no PIPELINING) in a background thread."""

    def __init__(self, host: str = "127.0.0.1", *, ehlo_refused: bool = False) -> None:
        self.handler = _Handler(ehlo_refused=ehlo_refused)
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """Serve until the loop is stopped, then close the server."""
        loop = self._loop
        asyncio.set_event_loop(loop)

        def factory() -> AiosmtpdSMTP:
            return AiosmtpdSMTP(self.handler, hostname="aiosmtpd.test", loop=loop)

        server = loop.run_until_complete(loop.create_server(factory, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        _close_loop(loop)

    @property
    def received(self) -> list[_Received]:
        """Return the messages received so far."""
        return self.handler.received

    def __enter__(self) -> AiosmtpdPeer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# -- aiosmtpd with STARTTLS, and a scripted server -------------------------------------------

PEER_NAME = "mx.example.test"
"""The name a Peer gives in its greeting unless told otherwise."""


@dataclass
class Seen:
    """One message a Peer accepted."""

    mail_from: str
    options: list[str]
    rcpt_tos: list[str]
    content: bytes
    tls: bool


@dataclass
class _Recorder:
    """aiosmtpd handler: records MAIL/RCPT/messages; refuses RCPTs beyond rcpt_limit with 452."""

    rcpt_limit: int | None = None
    mails: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    received: list[Seen] = field(default_factory=list)
    connections: int = 0
    """Connections accepted."""
    starttls: int = 0
    """STARTTLS commands received (whether or not the handshake then succeeded)."""

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Accept and record the sender with its parameters."""
        self.mails.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Accept up to rcpt_limit recipients per transaction."""
        self.rcpts.append(address)
        if self.rcpt_limit is not None and len(envelope.rcpt_tos) >= self.rcpt_limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        """Record the message and whether it came over TLS."""
        self.received.append(
            Seen(
                str(envelope.mail_from),
                list(envelope.mail_options),
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                session.ssl is not None,
            )
        )
        return "250 2.0.0 Message accepted"


class _CountingSMTP(AiosmtpdSMTP):
    """aiosmtpd's server, counting STARTTLS commands in its recorder."""

    def __init__(self, recorder: _Recorder, **kwargs: Any) -> None:
        super().__init__(recorder, **kwargs)
        self.recorder = recorder

    async def smtp_STARTTLS(self, arg: str) -> None:
        """Count the command, then do what aiosmtpd does."""
        self.recorder.starttls += 1
        await super().smtp_STARTTLS(arg)


class Peer:
    """aiosmtpd (a real third-party server, no PIPELINING), STARTTLS optional, in a thread."""

    def __init__(
        self,
        tls_context: ssl.SSLContext | None = None,
        *,
        require_starttls: bool = False,
        smtputf8: bool = False,
        rcpt_limit: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = PEER_NAME,
    ) -> None:
        self.handler = _Recorder(rcpt_limit)
        self.host = host
        self.port = port
        self._options: dict[str, Any] = {
            "hostname": hostname,
            "tls_context": tls_context,
            "require_starttls": require_starttls,
            "enable_SMTPUTF8": smtputf8,
        }
        self._error: OSError | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)

        def factory() -> AiosmtpdSMTP:
            self.handler.connections += 1
            session = _CountingSMTP(self.handler, loop=loop, **self._options)
            sessions.append(session)
            return session

        sessions: list[_CountingSMTP] = []

        try:
            server = loop.run_until_complete(loop.create_server(factory, self.host, self.port))
        except OSError as exc:  # e.g. the port asked for is taken on this address
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        # Hang up on clients still connected (a coordinator keeps idle sessions open): the
        # socket under any TLS layer, so no close_notify exchange holds the stop up.
        for session in sessions:
            transport = session._original_transport or session.transport
            if transport is not None:
                transport.close()
        loop.run_until_complete(server.wait_closed())
        _close_loop(loop)

    @property
    def received(self) -> list[Seen]:
        """Return the messages accepted so far."""
        return self.handler.received

    def __enter__(self) -> Peer:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("aiosmtpd did not start")
        if self._error is not None:
            self._thread.join(10)
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._error is None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def peers_on_one_port(makers: Sequence[Callable[[int], Peer]]) -> Iterator[list[Peer]]:
    """Start the Peers makers(port) build (each on its own address), all on one free port.

    The first takes a free port; the others must get the same one on their addresses, so
    a port taken there means starting over (a few times) on another.
    """
    for _ in range(20):
        with contextlib.ExitStack() as stack:
            try:
                first = stack.enter_context(makers[0](0))
                peers = [first, *(stack.enter_context(m(first.port)) for m in makers[1:])]
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            yield peers
            return
    raise AssertionError("found no port free on every peer's address")


class Scripted:
    """A scripted SMTP server on the client's own loop, for what no real server does on purpose.

    `starttls` says how it meets STARTTLS: a reply line (a 220 starts TLS with tls_context),
    or "garbage", "close", "hang" (220, then that), "silent" (no reply), "inject-reply" or
    "inject-partial" (plain-text bytes right behind the 220). RCPTs beyond rcpt_limit get
    limit_reply; local parts starting with "full-" get 452 4.2.2. stall_at names a verb (EHLO,
    MAIL, RCPT, DATA) at which the session stops answering and reads on in silence.
    """

    def __init__(
        self,
        *extensions: str,
        starttls: str = "220 2.0.0 Ready to start TLS",
        tls_context: ssl.SSLContext | None = None,
        tls_extensions: tuple[str, ...] | None = None,
        rcpt_limit: int | None = None,
        limit_reply: bytes = b"452 4.5.3 Too many recipients",
        stall_body: bool = False,
        stall_at: str | None = None,
    ) -> None:
        self.extensions = extensions
        self.stall_at = stall_at.encode() if stall_at else None
        self.tls_extensions = tls_extensions
        self.starttls = starttls
        self.tls_context = tls_context
        self.rcpt_limit = rcpt_limit
        self.limit_reply = limit_reply
        self.stall_body = stall_body
        self.lines: list[bytes] = []
        """Every command line received, in order (a STARTTLS marks where TLS began)."""
        self.messages: list[bytes] = []
        self.port = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in self._handlers:
            task.cancel()  # only a stalled session is still running
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._session(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass  # the client gave up: that is what these tests provoke
        except asyncio.CancelledError:
            pass  # ended by __aexit__: a clean end, not an error for asyncio to log
        finally:
            writer.close()

    async def _starttls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Meet STARTTLS as scripted; return True when the session goes on."""
        how = self.starttls
        if how in ("garbage", "close", "hang"):
            writer.write(b"220 2.0.0 Ready to start TLS\r\n")
            hello = await reader.read(5)  # the ClientHello is on its way: TLS has begun
            if how == "garbage" and hello:
                writer.write(b"this is not TLS at all\r\n" * 20)
                await writer.drain()
            while how == "hang" and await reader.read(65536):
                pass
            return False
        if how == "silent" or how.startswith("inject"):
            if how == "inject-reply":
                writer.write(b"220 2.0.0 Ready\r\n250 2.0.0 injected\r\n")
            elif how == "inject-partial":
                writer.write(b"220 2.0.0 Ready\r\n250 2.0.0 inj")
            while await reader.read(65536):
                pass
            return False
        writer.write(how.encode() + b"\r\n")
        if how.startswith("220"):
            assert self.tls_context is not None
            await writer.start_tls(self.tls_context)
            if self.tls_extensions is not None:
                self.extensions = self.tls_extensions
        return True

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        accepted = 0
        while line := await reader.readline():
            self.lines.append(line)
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == self.stall_at:
                # No reply to this or anything after it: the client's timeout for this step fires.
                while await reader.read(65536):
                    pass
                return
            if verb == b"EHLO":
                lines = [b"scripted.test", *(e.encode() for e in self.extensions)]
                writer.write(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]))
                writer.write(b"250 " + lines[-1] + b"\r\n")
            elif verb == b"STARTTLS":
                if not await self._starttls(reader, writer):
                    return
            elif verb == b"MAIL":
                accepted = 0
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if line.startswith(b"RCPT TO:<full-"):
                    writer.write(b"452 4.2.2 Mailbox full\r\n")
                elif self.rcpt_limit is not None and accepted >= self.rcpt_limit:
                    writer.write(self.limit_reply + b"\r\n")
                else:
                    accepted += 1
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not accepted:
                    writer.write(b"554 5.5.1 No valid recipients\r\n")
                    continue
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                if self.stall_body:
                    await asyncio.Event().wait()  # never read the body: the client must give up
                body = b""
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    body += chunk
                self.messages.append(body)
                writer.write(b"250 2.0.0 Queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            elif verb in (b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 Ok\r\n")
            else:
                writer.write(b"500 5.5.2 What?\r\n")


def run_deliverer(
    make: Callable[[Callable[[JobResult], None]], Any],
    jobs: list[Any],
    *,
    timeout: float = 20.0,
    after: Callable[[Any], Any] | None = None,
) -> tuple[list[JobResult], dict[str, Any]]:
    """Run a Deliverer built by make(on_result) on uvloop, submit jobs and wait for each result.

    Checks the contract on the way: exactly one result per job and one recipient result per
    recipient, in order. Returns the results in job order and the stats taken before drain().
    """
    results: dict[int, JobResult] = {}

    async def main() -> dict[str, Any]:
        done = asyncio.get_running_loop().create_future()

        def on_result(result: JobResult) -> None:
            assert result.job_id not in results, f"job {result.job_id} reported twice"
            results[result.job_id] = result
            if len(results) == len(jobs) and not done.done():
                done.set_result(None)

        deliverer = make(on_result)
        for job in jobs:
            deliverer.submit(job)
        if jobs:
            await asyncio.wait_for(done, timeout)
        if after is not None:
            await after(deliverer)
        stats: dict[str, Any] = deliverer.stats()
        await deliverer.drain(5.0)
        return stats

    stats = uvloop.run(main())
    ordered = [results[job.job_id] for job in jobs]
    for job, result in zip(jobs, ordered, strict=True):
        assert [r.recipient for r in result.results] == list(job.recipients)
    return ordered, stats
