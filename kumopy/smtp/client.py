"""One SMTP client conversation over asyncio: connect from a source address, EHLO, transactions."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import struct
from collections import deque
from dataclasses import dataclass, fields
from typing import cast

from kumopy.errors import (
    DeliveryError,
    InjectionError,
    ProtocolError,
    SMTPReplyError,
    SourceBindError,
)
from kumopy.smtp.replies import Reply, ReplyReader, synthesized
from kumopy.smtp.wire import wire_address

__all__ = [
    "END_OF_DATA",
    "SMTPClient",
    "Timeouts",
    "TransactionResult",
]

log = logging.getLogger(__name__)

END_OF_DATA = "."
"""The `command` label of the reply that follows the final dot of the message."""

_CRLF = b"\r\n"
_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_QUIT_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-step SMTP timeouts in seconds (defaults are KumoMTA's)."""

    connect: float = 60.0
    """TCP connection establishment."""
    banner: float = 60.0
    """Waiting for the 220 greeting."""
    ehlo: float = 300.0
    """Reply to EHLO or HELO."""
    mail_from: float = 300.0
    """Reply to MAIL FROM."""
    rcpt_to: float = 300.0
    """Reply to each RCPT TO."""
    data: float = 300.0
    """Reply to DATA, and writing the message body."""
    data_dot: float = 300.0
    """Reply after the final dot."""
    idle: float = 5.0
    """How long an unused connection stays open."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"timeout {f.name} must be a positive number, not {value!r}")


@dataclass(slots=True)
class TransactionResult:
    """The outcome of one mail transaction: one reply per recipient, in order."""

    replies: list[Reply]
    """The reply deciding each recipient's fate (real or synthesized)."""
    possible_duplicate: bool = False
    """True when the body was sent but the reply after the final dot was not seen."""


def _done(replies: list[Reply | None]) -> TransactionResult:
    """Wrap a list in which every recipient has its reply."""
    if None in replies:
        raise AssertionError("a recipient was left without a reply")
    return TransactionResult(replies)  # type: ignore[arg-type]


EXPECTED: dict[str, tuple[int, ...]] = {
    "banner": (220,),
    "EHLO": (250,),
    "HELO": (250,),
    "MAIL FROM": (250,),
    "RCPT TO": (250, 251),
    "DATA": (354,),
    END_OF_DATA: (250,),
    "RSET": (250,),
    "NOOP": (250,),
    "QUIT": (221,),
}
"""The positive reply each command calls for; any other positive reply is a protocol error."""


class _Transaction:
    """The state of one mail transaction while its replies come in."""

    __slots__ = ("accepted", "dot_sent", "out", "recipients", "stage", "timeout")

    def __init__(self, recipients: list[str], timeout: float) -> None:
        self.recipients = recipients
        self.out: list[Reply | None] = [None] * len(recipients)
        """The reply deciding each recipient, once known."""
        self.accepted: list[int] = []
        """Indexes of the recipients the server accepted at RCPT."""
        self.stage = "MAIL FROM"
        """What the session is waiting for, named in a failure."""
        self.timeout = timeout
        self.dot_sent = False
        """True once the final dot may have reached the server (a possible duplicate)."""


def _expire(fut: asyncio.Future[None]) -> None:
    """Fail a pending wait with TimeoutError (a loop.call_later callback)."""
    if not fut.done():
        fut.set_exception(TimeoutError())


def _wake(fut: asyncio.Future[None] | None) -> None:
    """Complete a pending wait, if any."""
    if fut is not None and not fut.done():
        fut.set_result(None)


class _ClientProtocol(asyncio.Protocol):
    """Collect replies from the transport and wake whoever waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = ReplyReader()
        self.replies: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.exc: Exception | None = None
        self.paused = False
        self.closed: asyncio.Future[None] = loop.create_future()
        # Replies owed by the server: the banner, plus one per command written. A reply beyond
        # them can only be matched to the wrong command, so it ends the session.
        self.owed = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse replies out of the received bytes."""
        try:
            replies = self.reader.feed(data)
        except ProtocolError as exc:
            self.fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if replies:
            self.owed -= len(replies)
            if self.owed < 0:
                self.fail(
                    ProtocolError(
                        f"the server sent {-self.owed} more repl{'y' if self.owed == -1 else 'ies'}"
                        f" than commands were sent (last: {replies[-1]})"
                    )
                )
                if self.transport is not None:
                    self.transport.abort()
                return
            self.replies.extend(replies)
            _wake(self.waiter)

    def eof_received(self) -> bool:
        """Let the transport close: the peer will not send anything more."""
        self.fail(ConnectionResetError("connection closed by the peer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Record the loss and wake every waiter."""
        self.fail(exc or ConnectionResetError("connection closed"))
        _wake(self.closed)

    def pause_writing(self) -> None:
        """Note that the transport's write buffer is full."""
        self.paused = True

    def resume_writing(self) -> None:
        """Note that the transport's write buffer has drained."""
        self.paused = False
        _wake(self.drain_waiter)

    def fail(self, exc: Exception) -> None:
        """Remember the first failure and wake waiters so they see it."""
        if self.exc is None:
            self.exc = exc
        _wake(self.waiter)
        _wake(self.drain_waiter)


class SMTPClient:
    """One SMTP session: connect, EHLO, then any number of transactions until quit()."""

    def __init__(self) -> None:
        self._proto: _ClientProtocol | None = None
        self._timeouts = Timeouts()
        self.extensions: dict[str, str] = {}
        """EHLO keywords (upper case) mapped to their parameters."""
        self.peer_address: str | None = None
        self.peer_port: int | None = None
        self.local_address: str | None = None
        """The local IP the kernel bound the connection to."""
        self.local_port: int | None = None
        self.transactions = 0
        """Completed MAIL transactions on this session."""
        self._ahead: bytes | None = None
        self._sock: socket.socket | None = None

    # -- properties ------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Return True while the session can take another transaction."""
        p = self._proto
        return p is not None and p.exc is None and p.transport is not None

    @property
    def pipelining(self) -> bool:
        """Return True when the server offered PIPELINING."""
        return "PIPELINING" in self.extensions

    @property
    def max_size(self) -> int:
        """Return the SIZE limit the server announced, 0 when none."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    @property
    def _where(self) -> str:
        return f"{self.peer_address}:{self.peer_port} from {self.local_address or 'any'}"

    # -- connection ------------------------------------------------------------------------------

    async def connect(
        self,
        host_addr: str,
        port: int,
        *,
        source_address: str | None,
        ehlo_domain: str,
        timeouts: Timeouts | None = None,
    ) -> Reply:
        """Open the session from source_address and greet; return the EHLO/HELO reply."""
        if not ehlo_domain or _UNSAFE.search(ehlo_domain) or not ehlo_domain.isascii():
            raise ValueError(f"invalid EHLO domain {ehlo_domain!r}")
        if self._proto is not None:
            raise RuntimeError("SMTPClient.connect() called twice")
        self._timeouts = t = timeouts or Timeouts()
        self.peer_address, self.peer_port = host_addr, port
        self.local_address = source_address
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source_address:
                try:
                    sock.bind((source_address, 0))
                except OSError as exc:
                    raise SourceBindError(
                        f"cannot bind source address {source_address}: {self._explain(exc)}",
                        source_address,
                        errno.errorcode.get(exc.errno or 0, "unknown"),
                    ) from exc
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (host_addr, port)), t.connect)
            except TimeoutError:
                raise DeliveryError(
                    f"connect to {self._where} timed out after {t.connect:g}s"
                ) from None
            except OSError as exc:
                raise DeliveryError(
                    f"connect to {self._where} failed: {self._explain(exc)}"
                ) from exc
            self.local_address, self.local_port = sock.getsockname()[:2]
            proto = _ClientProtocol(loop)
            await loop.create_connection(lambda: proto, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._proto = proto
        self._sock = sock
        try:
            banner = await self._reply(t.banner, "banner")
            if banner.code != 220:
                raise SMTPReplyError(banner.code, banner.text, banner.enhanced_code, "banner")
            return await self._greet(ehlo_domain)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise DeliveryError(f"session with {self._where} failed: {self._explain(exc)}") from exc
        except BaseException:
            self.close()
            raise

    async def _greet(self, ehlo_domain: str) -> Reply:
        """Send EHLO (HELO if EHLO is refused with 5xx) and record the extensions."""
        t = self._timeouts
        name = ehlo_domain.encode("ascii")
        self._write(b"EHLO " + name + _CRLF)
        reply = await self._reply(t.ehlo, "EHLO")
        if reply.code == 250:
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params
            return reply
        if reply.is_permanent:
            self._write(b"HELO " + name + _CRLF)
            reply = await self._reply(t.ehlo, "HELO")
            if reply.code == 250:
                return reply
        raise SMTPReplyError(reply.code, reply.text, reply.enhanced_code, reply.command)

    # -- low level -------------------------------------------------------------------------------

    def _write(self, data: bytes, replies: int = 1) -> None:
        """Queue bytes owing `replies` replies; raise the recorded failure if the session died."""
        p = self._proto
        if p is None or p.transport is None:
            raise ConnectionResetError("not connected")
        if p.exc is not None:
            raise p.exc
        p.owed += replies
        p.transport.write(data)

    async def _drain(self, timeout: float) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        p = self._proto
        assert p is not None
        if p.exc is not None:
            raise p.exc
        if not p.paused:
            return
        fut: asyncio.Future[None] = p.loop.create_future()
        p.drain_waiter = fut
        handle = p.loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            handle.cancel()
            p.drain_waiter = None
        if p.exc is not None:
            raise p.exc

    async def _reply(self, timeout: float, command: str) -> Reply:
        """Return the next reply, labelled with its command; raise on timeout, loss or a wrong code.

        A 4xx or 5xx reply is returned for the caller to act on. A positive reply other than
        the one the command calls for (250 to DATA, 354 to RCPT, ...) means the replies no
        longer line up with the commands: it raises ProtocolError, which ends the session.
        """
        p = self._proto
        assert p is not None
        if not p.replies:
            if p.exc is None:
                fut: asyncio.Future[None] = p.loop.create_future()
                p.waiter = fut
                handle = p.loop.call_later(timeout, _expire, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    p.waiter = None
            if not p.replies:
                raise p.exc or ConnectionResetError("connection closed")
        reply = p.replies.popleft()
        if reply.code == 421:
            # The server is closing the channel; nothing more may be sent on it.
            p.fail(ConnectionResetError(f"server closing the connection: {reply}"))
        elif reply.code < 400 and reply.code not in EXPECTED[command]:
            wanted = " or ".join(map(str, EXPECTED[command]))
            raise ProtocolError(f"the server answered {command} with {reply} (expected {wanted})")
        return Reply(reply.code, reply.enhanced_code, reply.text, command)

    def _explain(self, exc: BaseException) -> str:
        """Describe a session failure for a synthesized reply."""
        if isinstance(exc, TimeoutError):
            return "timed out"
        if isinstance(exc, OSError) and exc.errno:
            # asyncio puts its own text in strerror ("Connect call failed ..."); use the OS's.
            return os.strerror(exc.errno)
        return str(exc) or type(exc).__name__

    def _failure(self, exc: BaseException, stage: str, timeout: float) -> Reply:
        """Turn a session failure during stage into a transient synthesized reply."""
        if isinstance(exc, TimeoutError):
            why = f"timed out after {timeout:g}s waiting for the reply to {stage}"
        elif isinstance(exc, ProtocolError):
            why = f"protocol error at {stage}: {exc}"
        else:
            why = f"connection lost during {stage}: {self._explain(exc)}"
        return synthesized(451, "4.4.2", f"kumopy: session with {self._where} {why}")

    # -- transactions ----------------------------------------------------------------------------

    def _commands(self, sender: str, recipients: list[str], payload: bytes) -> list[bytes]:
        """Return the MAIL FROM command followed by one RCPT TO per recipient."""
        mail = b"MAIL FROM:<" + wire_address(sender, where="sender") + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(payload)
        if "8BITMIME" in self.extensions and not payload.isascii():
            mail += b" BODY=8BITMIME"
        cmds = [mail + _CRLF]
        cmds += [b"RCPT TO:<" + wire_address(r) + b">\r\n" for r in recipients]
        return cmds

    def _refusal(self, payload: bytes) -> Reply | None:
        """Return the permanent reply for a payload this server cannot take, or None."""
        limit = self.max_size
        if limit and len(payload) > limit:
            text = f"kumopy: message of {len(payload)} bytes exceeds the server's SIZE {limit}"
            return synthesized(552, "5.3.4", text)
        if "8BITMIME" not in self.extensions and not payload.isascii():
            # Converting to 7 bit would break the DKIM signature the message may carry.
            text = (
                f"kumopy: the message has 8-bit content and {self.peer_address} does not "
                "offer 8BITMIME"
            )
            return synthesized(554, "5.6.3", text)
        return None

    async def send_transaction(
        self,
        sender: str,
        recipients: list[str],
        payload: bytes,
        *,
        then: tuple[str, list[str], bytes] | None = None,
    ) -> TransactionResult:
        """Send one message (payload from encode_data) to recipients; return their replies.

        With PIPELINING, `then` names the next transaction on this session: its envelope is
        sent right behind this body (RFC 2920 lets content lead a command group), and the next
        call must be for exactly that transaction.
        """
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        cmds = self._commands(sender, recipients, payload)
        ahead: bytes | None = None
        if then is not None and self.pipelining and then[1] and self._refusal(then[2]) is None:
            with contextlib.suppress(InjectionError):
                ahead = b"".join(self._commands(*then)) + b"DATA\r\n"
        if not self.usable:
            raise DeliveryError(f"session with {self._where} is not usable")
        refused = self._refusal(payload) if self._ahead is None else None
        if refused is not None:
            return TransactionResult([refused] * len(recipients))
        txn = _Transaction(recipients, self._timeouts.mail_from)
        try:
            if self.pipelining:
                go = await self._envelope_pipelined(txn, cmds)
            else:
                go = await self._envelope_serial(txn, cmds)
            if go:
                await self._body(txn, payload, ahead)
        except (OSError, ProtocolError) as exc:
            return self._broken(txn, exc)
        return _done(txn.out)

    async def _envelope_pipelined(self, txn: _Transaction, cmds: list[bytes]) -> bool:
        """Send MAIL, every RCPT and DATA in one write (RFC 2920) and read their replies."""
        t = self._timeouts
        envelope = b"".join(cmds) + b"DATA\r\n"
        if self._ahead is None:
            self._write(envelope, len(cmds) + 1)
        elif self._ahead == envelope:
            self._ahead = None  # already on the wire behind the previous body
        else:
            self.close()
            raise RuntimeError("send_transaction() does not match the `then` announced")
        mail = await self._reply(t.mail_from, "MAIL FROM")
        if not mail.is_positive:
            txn.out = [mail] * len(txn.recipients)
        txn.stage, txn.timeout = "RCPT TO", t.rcpt_to
        for i in range(len(txn.recipients)):
            reply = await self._reply(t.rcpt_to, "RCPT TO")
            if reply.is_positive:
                txn.accepted.append(i)
            elif txn.out[i] is None:
                txn.out[i] = reply
        if not mail.is_positive:
            txn.accepted = []
        txn.stage, txn.timeout = "DATA", t.data
        return await self._data_reply(txn, mail.is_positive)

    async def _envelope_serial(self, txn: _Transaction, cmds: list[bytes]) -> bool:
        """Send MAIL, each RCPT, then DATA, one command per reply."""
        t = self._timeouts
        self._write(cmds[0])
        mail = await self._reply(t.mail_from, "MAIL FROM")
        if not mail.is_positive:
            txn.out = [mail] * len(txn.recipients)
            return False
        txn.stage, txn.timeout = "RCPT TO", t.rcpt_to
        for i, cmd in enumerate(cmds[1:]):
            self._write(cmd)
            reply = await self._reply(t.rcpt_to, "RCPT TO")
            if reply.is_positive:
                txn.accepted.append(i)
            else:
                txn.out[i] = reply
        if not txn.accepted:
            txn.stage, txn.timeout = "RSET", t.mail_from
            await self.rset()
            return False
        txn.stage, txn.timeout = "DATA", t.data
        self._write(b"DATA\r\n")
        return await self._data_reply(txn, True)

    async def _data_reply(self, txn: _Transaction, mail_ok: bool) -> bool:
        """Read the reply to DATA; return True when the body is to be sent."""
        t = self._timeouts
        reply = await self._reply(t.data, "DATA")
        if reply.code != 354:
            for i in txn.accepted:
                txn.out[i] = reply
            if mail_ok and reply.code != 421:
                txn.stage, txn.timeout = "RSET", t.mail_from
                await self.rset()
            return False
        txn.stage, txn.timeout = "message body", t.data
        if not txn.accepted:
            # The server wants a body nobody will receive: end it at once (RFC 2920).
            self._write(b".\r\n")
            await self._reply(t.data_dot, END_OF_DATA)
            return False
        return True

    async def _body(self, txn: _Transaction, payload: bytes, ahead: bytes | None) -> None:
        """Send the body (and the next envelope, if any) and read the reply to the final dot."""
        t = self._timeouts
        if ahead is None:
            self._write(payload)
        else:
            owed = ahead.count(_CRLF)  # MAIL, each RCPT and DATA: one reply per line
            if len(payload) < 65536:
                self._write(payload + ahead, 1 + owed)
            else:
                self._write(payload)
                self._write(ahead, owed)
            self._ahead = ahead
        await self._drain(t.data)
        txn.dot_sent = True
        txn.stage, txn.timeout = "the final dot", t.data_dot
        final = await self._reply(t.data_dot, END_OF_DATA)
        for i in txn.accepted:
            txn.out[i] = final
        self.transactions += 1

    def _broken(self, txn: _Transaction, exc: OSError | ProtocolError) -> TransactionResult:
        """End a session that failed mid-transaction; every open recipient is transient."""
        p = self._proto
        if p is not None:
            if not txn.dot_sent and txn.stage == "message body" and p.transport is not None:
                # Everything handed to the kernel may have reached the peer, dot included.
                txn.dot_sent = p.transport.get_write_buffer_size() == 0
            p.fail(exc)
            if p.transport is not None:
                p.transport.abort()
        failure = self._failure(exc, txn.stage, txn.timeout)
        log.debug("transaction with %s failed at %s: %s", self._where, txn.stage, failure.text)
        return TransactionResult(
            [r if r is not None else failure for r in txn.out], possible_duplicate=txn.dot_sent
        )

    async def rset(self) -> Reply:
        """Abort the current transaction with RSET and return the reply."""
        self._write(b"RSET\r\n")
        return await self._reply(self._timeouts.mail_from, "RSET")

    async def noop(self) -> Reply:
        """Send NOOP and return the reply."""
        self._write(b"NOOP\r\n")
        return await self._reply(self._timeouts.mail_from, "NOOP")

    async def quit(self) -> None:
        """Say QUIT politely (errors ignored) and close the connection."""
        if self.usable:
            try:
                self._write(b"QUIT\r\n")
                await self._reply(min(_QUIT_TIMEOUT, self._timeouts.idle), "QUIT")
            except (OSError, ProtocolError) as exc:
                log.debug("QUIT to %s failed: %s", self._where, exc)
        self.close()

    def arm_reset(self) -> None:
        """Make closing the socket (or exiting) send a TCP reset instead of the unsent data.

        Used when the coordinator is gone: a body cut short by a reset is never taken by the
        peer, so only a transaction whose final dot already left can be delivered twice. It
        only sets a socket option, so a signal handler may call it.
        """
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def close(self) -> None:
        """Close the connection at once."""
        p = self._proto
        if p is not None and p.transport is not None:
            p.fail(ConnectionResetError("connection closed by kumopy"))
            p.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the transport reports the connection lost."""
        p = self._proto
        if p is not None and p.transport is not None:
            await p.closed
