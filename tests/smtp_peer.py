"""Test helpers: SMTP peers on loopback (our sink, in-process or as a process; aiosmtpd)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
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
    "ROOT",
    "AiosmtpdPeer",
    "SinkProcess",
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
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

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
