"""A small authoritative DNS server on loopback, for tests, the demo and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections import Counter
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["FakeDNS"]

log = logging.getLogger(__name__)

_UDP_LIMIT = 512
"""Largest UDP answer to a query without EDNS (RFC 1035 section 4.2.1)."""
_MAX_CHAIN = 8
"""CNAMEs followed inside the zone before giving up, as a resolver would."""


def _name(text: str | dns.name.Name) -> dns.name.Name:
    """Return text as an absolute, lower-case name ("example.test" and "example.test." alike)."""
    name = text if isinstance(text, dns.name.Name) else dns.name.from_text(text)
    return name.canonicalize()


class _UDP(asyncio.DatagramProtocol):
    """Hand each datagram to the server; answers may come later, in any order."""

    def __init__(self, server: FakeDNS) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: Python 3.11's selector transport for datagrams does
        # not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        wire = await self.server._respond(data, tcp=False)
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class FakeDNS:
    """Answer A, AAAA, MX, TXT, CNAME... from a zone the test edits while the server runs."""

    def __init__(self, host: str = "127.0.0.1", soa_minimum: int = 60) -> None:
        self.host = host
        self.port = 0
        self.soa_minimum = soa_minimum
        """Negative-caching TTL (RFC 2308) carried by the SOA of NXDOMAIN and NODATA answers."""
        self.queries: Counter[tuple[str, str]] = Counter()
        """Queries received, by (name with its final dot, type), e.g. ("example.test.", "MX")."""
        self._lock = threading.Lock()
        # Copy-on-write: add() replaces an RRset rather than changing it, so an answer being
        # rendered in the server thread never sees a half-changed set.
        self._zone: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._rcodes: dict[dns.name.Name, dns.rcode.Rcode] = {}
        self._delays: dict[dns.name.Name, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._socks: list[socket.socket] = []
        self._closers: list[asyncio.BaseTransport | asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the zone, changed from any thread ------------------------------------------------

    def add(self, name: str, rdtype: str, text: str, ttl: int = 300) -> None:
        """Add one record, e.g. add("example.test", "MX", "10 mx1.example.test.")."""
        owner = _name(name)
        new = dns.rrset.from_text_list(
            owner, ttl, dns.rdataclass.IN, rdtype, [text], origin=dns.name.root, relativize=False
        )
        with self._lock:
            node = self._zone.setdefault(owner, {})
            old = node.get(new.rdtype)
            if old is not None:
                new = dns.rrset.from_rdata_list(owner, min(old.ttl, ttl), [*old, *new])
            node[new.rdtype] = new

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove a name's records of one type, or all of them."""
        owner = _name(name)
        with self._lock:
            if rdtype is None:
                self._zone.pop(owner, None)
            else:
                node = self._zone.get(owner, {})
                node.pop(dns.rdatatype.from_text(rdtype), None)
                if not node:
                    self._zone.pop(owner, None)

    def set_rcode(self, name: str, rcode: dns.rcode.Rcode | None) -> None:
        """Answer every query for name with this rcode (e.g. SERVFAIL); None restores it."""
        with self._lock:
            if rcode is None:
                self._rcodes.pop(_name(name), None)
            else:
                self._rcodes[_name(name)] = rcode

    def set_delay(self, name: str, seconds: float) -> None:
        """Answer queries for name after this many seconds, without holding up the others."""
        with self._lock:
            if seconds > 0:
                self._delays[_name(name)] = seconds
            else:
                self._delays.pop(_name(name), None)

    def count(self, name: str, rdtype: str) -> int:
        """Return how many queries for (name, type) arrived."""
        with self._lock:
            return self.queries[(_name(name).to_text(), rdtype.upper())]

    @property
    def address(self) -> str:
        """Return "host:port" ("[::1]:port" for IPv6), the form a ResolverConfig takes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- answers ---------------------------------------------------------------------------

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """Build the response to one query from the zone as it is now."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name.canonicalize(), question.rdtype
        with self._lock:
            self.queries[(qname.to_text(), dns.rdatatype.to_text(qtype))] += 1
            rcode = self._rcodes.get(qname)
            if rcode is not None:
                response.set_rcode(rcode)
                return response
            name = qname
            for _ in range(_MAX_CHAIN):
                node = self._zone.get(name, {})
                found = node.get(qtype)
                if found is not None:
                    response.answer.append(found)
                    return response
                cname = node.get(dns.rdatatype.CNAME)
                if cname is None or qtype == dns.rdatatype.CNAME:
                    break
                response.answer.append(cname)
                name = _name(cname[0].target)
            exists = any(owner.is_subdomain(name) for owner in self._zone)
        response.set_rcode(dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN)
        response.authority.append(self._soa())
        return response

    def _soa(self) -> dns.rrset.RRset:
        # Owned by the root, so it is a superdomain of every name asked: dnspython looks the
        # negative TTL up in the SOA of the qname or of one of its parents.
        text = f"ns.fakedns.test. hostmaster.fakedns.test. 1 3600 600 86400 {self.soa_minimum}"
        return dns.rrset.from_text(dns.name.root, 3600, dns.rdataclass.IN, "SOA", text)

    async def _respond(self, data: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException as exc:
            log.debug("fakedns: dropping a malformed query: %s", exc)
            return None
        delay = 0.0
        if len(query.question) == 1:
            with self._lock:
                delay = self._delays.get(query.question[0].name.canonicalize(), 0.0)
        if delay:
            await asyncio.sleep(delay)
        response = self.answer(query)
        if tcp:
            return response.to_wire(max_size=65535)
        # Without EDNS a UDP answer must fit 512 bytes; beyond that, TC tells the client
        # to ask again over TCP.
        limit = query.payload if query.edns >= 0 else _UDP_LIMIT
        return response.to_wire(max_size=limit, prefer_truncation=True)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked like the UDP answers, so stop() cancels a connection still open.
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = await self._respond(await reader.readexactly(size), tcp=True)
                if wire is None:
                    break
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up: normal at the end of a TCP exchange
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life cycle ------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """Bind UDP and TCP sockets to one free port (a few tries: the TCP port may be taken)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            # A burst of hundreds of queries must not overflow the default receive buffer
            # (lost queries would only measure the buffer, not the resolver).
            for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                if option is not None:
                    try:
                        udp.setsockopt(socket.SOL_SOCKET, option, 8 * 1024 * 1024)
                        break
                    except OSError:
                        continue
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(64)
            except OSError:
                udp.close()
                tcp.close()
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(f"fakedns: found no port free for both UDP and TCP on {self.host}")

    def start(self) -> FakeDNS:
        """Bind a free port and serve it in a background thread; return self."""
        if self._thread is not None:
            raise RuntimeError("fakedns: already started")
        udp, tcp = self._bind()
        self._socks = [udp, tcp]
        self.port = udp.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=udp)
                server = await asyncio.start_server(self._serve_tcp, sock=tcp)
                self._closers = [transport, server]
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            with contextlib.suppress(BaseException):
                loop.run_until_complete(serve())
            if not failure:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fakedns", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure or not ready.is_set():
            self.stop()
            raise RuntimeError(f"fakedns: could not start: {failure[0] if failure else 'hung'}")
        return self

    def stop(self) -> None:
        """Stop serving, join the thread and close the sockets (idempotent)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None and thread.is_alive():

            async def shutdown() -> None:
                for closer in self._closers:
                    closer.close()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                loop.stop()

            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(shutdown()))
            thread.join(10)
        for sock in self._socks:
            sock.close()
        self._socks = []
        self._closers = []

    def __enter__(self) -> FakeDNS:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
