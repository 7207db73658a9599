"""The coordinator's side of the zygote: start it, ask it for workers, restart it when it dies."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time

from kumopy.ipc.pipe import read_frame, write_frame
from kumopy.parent import become_subreaper

__all__ = ["Zygote"]

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 10.0
"""A fork takes milliseconds; a zygote silent this long is killed and workers are exec'd."""
_CHUNK = 16
"""Requests written before their replies are read: a few KiB each, well within a pipe's
buffer, so a stuck zygote cannot block the write; one round trip per chunk, not per worker."""
_CHUNK_BYTES = 32 * 1024
"""A chunk's arguments stay under this (half a pipe's buffer): a worker serving several
sources (--sources-per-worker) has a definition per source, a few hundred bytes each."""


class Zygote:
    """A process that imported the worker's modules once and forks workers on request.

    Every method is non-blocking except `wait_ready` and `spawn` (a reply per request).
    While the zygote is not usable (booting, dead, refused), `spawn` returns None and the
    arbiter execs the worker instead: the zygote makes starts cheap, never possible.
    """

    def __init__(
        self,
        log_level: str = "INFO",
        boot_timeout: float = 60.0,
        backoff: tuple[float, float] = (1.0, 60.0),
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        self.log_level = log_level
        self.boot_timeout = boot_timeout
        self.backoff = backoff
        self.reply_timeout = reply_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.abandoned = False
        """Killed for misbehaving and not reaped yet: asked for nothing more."""
        self.started = 0.0
        self.next_start: float | None = 0.0
        """When to (re)start the zygote (monotonic); None: never (the kernel lacks support)."""
        self.deaths = 0
        self.forks = 0
        self._to = self._from = -1

    @property
    def pid(self) -> int | None:
        """Return the zygote's pid while it runs."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Exec the zygote; it says hello once its imports are done (see `poll`)."""
        # Workers are forked by the zygote's child and reparented to us: only a subreaper
        # adopts them (else init would, and we could neither reap them nor see their codes).
        if not become_subreaper():
            log.warning("PR_SET_CHILD_SUBREAPER unavailable: workers are exec'd, not forked")
            self.next_start = None
            return
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cmd = [
            *(sys.executable, "-m", "kumopy", "zygote"),
            *("--fd-in", str(req_r), "--fd-out", str(rep_w)),
            *("--parent-pid", str(os.getpid()), "--log-level", self.log_level),
        ]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(req_r, rep_w), close_fds=True)
        except OSError as exc:
            os.close(req_w)
            os.close(rep_r)
            self._schedule(f"cannot start the zygote: {exc}")
            return
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._to, self._from = req_w, rep_r
        self.ready = self.abandoned = False
        self.started = time.monotonic()
        self.next_start = None
        log.info("started the zygote (pid %d)", self.proc.pid)

    def poll(self) -> bool:
        """Return True when the zygote can fork now; take its hello if it just arrived."""
        if self.proc is None or self.abandoned:
            return False
        if not self.ready:
            poller = select.poll()
            poller.register(self._from, select.POLLIN)
            if poller.poll(0):
                self._take_hello()
        return self.ready

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` for the zygote's hello (at start, before the workers)."""
        if self.proc is None or self.abandoned or self.ready:
            return self.ready
        poller = select.poll()
        poller.register(self._from, select.POLLIN)
        if poller.poll(max(0.0, timeout) * 1000):
            self._take_hello()
        else:
            self._abandon(f"no hello within {timeout:.0f}s")
        return self.ready

    def _take_hello(self) -> None:
        try:
            hello = read_frame(self._from, self.reply_timeout)
        except (OSError, EOFError, ValueError) as exc:
            self._abandon(f"bad hello: {exc}")
            return
        self.ready = True
        log.info(
            "zygote %s ready in %.2fs (%s modules preloaded)",
            hello.get("hello"),
            time.monotonic() - self.started,
            hello.get("modules"),
        )

    def spawn(self, argv: list[str]) -> int | None:
        """Ask the zygote to fork a worker with these arguments; None when it cannot."""
        return self.spawn_many([argv])[0]

    def spawn_many(self, argvs: list[list[str]]) -> list[int | None]:
        """Ask for a worker per argument list; each pid, or None where it cannot."""
        pids: list[int | None] = []
        for chunk in _chunks(argvs):
            if not self.poll():
                pids += [None] * len(chunk)
                continue
            try:
                for argv in chunk:
                    write_frame(self._to, {"argv": argv})
                replies = [read_frame(self._from, self.reply_timeout) for _ in chunk]
            except (OSError, EOFError, ValueError) as exc:
                # Some of this chunk may have been forked, unknown to us: they exit with us.
                self._abandon(f"no answer: {exc}")
                pids += [None] * len(chunk)
                continue
            pids += [self._pid_of(reply) for reply in replies]
        return pids

    def _pid_of(self, reply: dict[str, object]) -> int | None:
        pid = reply.get("pid")
        if type(pid) is not int or pid <= 0:
            log.warning("the zygote could not fork a worker: %s", reply.get("error"))
            return None
        self.forks += 1
        self.deaths = 0  # it works: a later death restarts it after the shortest delay
        return pid

    def tick(self, stopping: bool) -> None:
        """Restart a dead zygote once its backoff passed; give up on one that never booted."""
        now = time.monotonic()
        if self.proc is None:
            if not stopping and self.next_start is not None and now >= self.next_start:
                self.start()
        elif not self.poll() and not self.abandoned and now - self.started > self.boot_timeout:
            self._abandon(f"not ready after {self.boot_timeout:.0f}s")

    def exited(self, code: int) -> None:
        """Note that the zygote exited (the arbiter reaped it) and plan its restart."""
        if self.proc is not None:
            self.proc.returncode = code  # keep Popen from waiting on a reaped pid
        self._close()
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        self._schedule(f"the zygote exited ({how})")

    def _schedule(self, reason: str) -> None:
        self.proc = None
        self.ready = self.abandoned = False
        base, cap = self.backoff
        delay = min(cap, base * 2**self.deaths)
        self.deaths += 1
        self.next_start = time.monotonic() + delay
        log.warning("%s; workers are exec'd until it restarts in %.0fs", reason, delay)

    def _abandon(self, reason: str) -> None:
        """Kill a zygote that misbehaves; the arbiter reaps it and calls `exited`."""
        log.error("zygote %s: %s; killing it", self.pid, reason)
        self.ready, self.abandoned = False, True
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def _close(self) -> None:
        for fd in (self._to, self._from):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to = self._from = -1

    def stop(self, timeout: float = 5.0) -> None:
        """Close the request pipe (the zygote exits at its end) and reap the zygote."""
        self.next_start = None
        proc, self.proc, self.ready = self.proc, None, False
        self._close()
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _chunks(argvs: list[list[str]]) -> list[list[list[str]]]:
    """Split requests into chunks of at most _CHUNK, and _CHUNK_BYTES unless one is larger."""
    chunks: list[list[list[str]]] = []
    size = 0
    for argv in argvs:
        n = sum(len(a) + 4 for a in argv)
        if not chunks or len(chunks[-1]) >= _CHUNK or size + n > _CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(argv)
        size += n
    return chunks
