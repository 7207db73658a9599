"""Route lookups (MX and MTA-STS) in a child process: DNS work never takes the coordinator's GIL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from kumopy.dns import MXResolver, Resolution, ResolvedHost, ResolverConfig, normalize_domain
from kumopy.errors import DNSError, DNSUnavailableError, error_from_dict
from kumopy.mtasts import StsFetcher, StsPolicy
from kumopy.parent import die_with_parent

__all__ = ["Lookup", "ResolverProcess", "serve"]

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_MAX_FRAME = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Lookup:
    """One finished lookup: where the domain's mail goes, and its MTA-STS policy if asked."""

    domain: str
    """The domain as submitted."""
    resolution: Resolution
    sts: StsPolicy | None = None
    """The domain's MTA-STS policy; None when it has none, or it was not asked for."""


def _to_wire(lookup: Lookup) -> dict[str, Any]:
    res = lookup.resolution
    sts = lookup.sts
    return {
        "domain": lookup.domain,
        "res": [
            res.domain,
            res.site,
            [[h.name, h.preference, list(h.addresses)] for h in res.hosts],
            res.expires,
            res.error.to_dict() if res.error is not None else None,
            list(res.notes),
            res.implicit,
        ],
        "sts": dataclasses.astuple(sts) if sts is not None else None,
    }


def _from_wire(data: dict[str, Any]) -> Lookup:
    domain, site, hosts, expires, error, notes, implicit = data["res"]
    err = error_from_dict(error) if error is not None else None
    if err is not None and not isinstance(err, DNSError):
        err = DNSUnavailableError(domain, err.message)
    res = Resolution(
        domain,
        site,
        tuple(ResolvedHost(n, p, tuple(a)) for n, p, a in hosts),
        float(expires),  # CLOCK_MONOTONIC: one clock for every process of the host
        err,
        tuple(notes),
        bool(implicit),
    )
    sts_row = data["sts"]
    sts = None
    if sts_row is not None:
        mode, mx, max_age, policy_id, fetched = sts_row
        sts = StsPolicy(mode, tuple(mx), int(max_age), policy_id, float(fetched))
    return Lookup(str(data["domain"]), res, sts)


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _frames(buf: bytearray) -> Iterator[Any]:
    """Take every complete frame out of buf."""
    while len(buf) >= _LEN.size:
        (size,) = _LEN.unpack_from(buf)
        if size > _MAX_FRAME:
            raise ValueError(f"resolver frame of {size} bytes")
        if len(buf) < _LEN.size + size:
            return
        body = bytes(buf[_LEN.size : _LEN.size + size])
        del buf[: _LEN.size + size]
        yield msgpack.unpackb(body, raw=False)


class ResolverProcess:
    """The coordinator's side: submit() never blocks; poll fileno(), then drain()."""

    def __init__(
        self, config: ResolverConfig, sts: dict[str, Any] | None = None, log_level: str = "INFO"
    ) -> None:
        self.config = config
        self.sts = dict(sts or {})
        self.log_level = log_level
        self._pending: dict[str, bool] = {}
        """Domains submitted and not answered yet (sent again if the child is restarted)."""
        self._buf = bytearray()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        settings = json.dumps({"config": dataclasses.asdict(self.config), "sts": self.sts})
        cmd = [sys.executable, "-m", "kumopy", "resolver", "--fd", str(theirs.fileno())]
        cmd += ["--settings", settings, "--parent-pid", str(os.getpid())]
        cmd += ["--log-level", self.log_level]
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        for domain, sts in self._pending.items():
            self._send({"d": domain, "s": sts})

    def _send(self, obj: Any) -> None:
        assert self._sock is not None
        data = _frame(obj)
        # Requests are small and the child reads them at once; a full buffer means it is
        # stuck, and blocking briefly is then better than dropping the lookup.
        self._sock.setblocking(True)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            log.error("resolver process unreachable (%s); restarting it", exc)
            self._restart()
        finally:
            if self._sock is not None:
                self._sock.setblocking(False)

    def submit(self, domain: str, sts: bool = False) -> None:
        """Start looking a domain up (and its MTA-STS policy); the answer comes from drain()."""
        self._pending[domain] = sts
        self._send({"d": domain, "s": sts})

    def fileno(self) -> int:
        """Return the fd that becomes readable when drain() has something."""
        assert self._sock is not None
        return self._sock.fileno()

    def drain(self) -> list[Lookup]:
        """Return every lookup finished since the last call (never blocks)."""
        assert self._sock is not None
        closed = False
        while True:
            try:
                chunk = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            self._buf += chunk
        out = []
        for data in _frames(self._buf):
            lookup = _from_wire(data)
            self._pending.pop(lookup.domain, None)
            out.append(lookup)
        if closed:
            log.error("the resolver process exited; restarting it")
            self._restart()
        return out

    def _restart(self) -> None:
        self._stop_child()
        self._buf.clear()
        self._start()

    def _stop_child(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def is_alive(self) -> bool:
        """Return True while the resolver process runs."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the resolver process (idempotent)."""
        self._stop_child()


# -- the child's side -----------------------------------------------------------------------


async def _serve(sock: socket.socket, resolver: MXResolver, sts: StsFetcher) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    tasks: set[asyncio.Task[None]] = set()

    async def answer(domain: str, with_sts: bool) -> None:
        policy: StsPolicy | None = None
        try:
            if with_sts:
                # Both at once: the policy fetch must not add its latency to the MX lookup.
                result, policy = await asyncio.gather(
                    resolver.resolve(domain), sts.policy_or_none(domain)
                )
            else:
                result = await resolver.resolve(domain)
        except Exception as exc:
            # A bug, not a DNS answer: still one answer per request, so the domain's queue is
            # not left waiting for ever.
            log.exception("resolving %s failed", domain)
            name = normalize_domain(domain)
            error = DNSUnavailableError(name, f"resolving {name} failed: {exc!r}")
            result = Resolution(name, name, (), 0.0, error)
        writer.write(_frame(_to_wire(Lookup(domain, result, policy))))

    problem = await resolver.check()
    if problem is not None:
        log.error(
            "DNS: %s; queues without mx_list will wait for it (name the servers with "
            "kumo.dns.configure_resolver(name_servers=[...]) in the policy)",
            problem,
        )
    else:
        log.info("DNS: resolving with %s", resolver.servers)
    buf = bytearray()
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            return  # the coordinator is gone
        buf += chunk
        for request in _frames(buf):
            task = asyncio.create_task(answer(str(request["d"]), bool(request["s"])))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def serve(fd: int, settings: str, parent_pid: int) -> int:
    """Entry point of `python -m kumopy resolver`: answer lookups until the parent goes."""
    die_with_parent()
    if os.getppid() != parent_pid:
        return 0
    options = json.loads(settings)
    fields = options["config"]
    config = ResolverConfig(**{**fields, "name_servers": tuple(fields["name_servers"])})
    resolver = MXResolver(config)
    sts = StsFetcher(resolver.addresses, resolver.txt, **options["sts"])
    sock = socket.socket(fileno=fd)
    asyncio.run(_serve(sock, resolver, sts))
    return 0
