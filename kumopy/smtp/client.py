"""One SMTP client session over asyncio: connect from a source, EHLO, STARTTLS, transactions."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct

from kumopy.errors import (
    DeliveryError,
    InjectionError,
    ProtocolError,
    SMTPReplyError,
    SourceBindError,
    TlsHandshakeError,
    TlsUnavailableError,
)
from kumopy.hostnames import UNSAFE
from kumopy.smtp.exchange import Exchange
from kumopy.smtp.protocol import ClientProtocol, Timeouts
from kumopy.smtp.replies import Reply, synthesized
from kumopy.smtp.tls import TlsInfo, TlsPolicy, context_for, upgrade
from kumopy.smtp.transaction import Transaction, TransactionResult, refusal
from kumopy.smtp.wire import wire_address

__all__ = ["SMTPClient", "TransactionResult"]

log = logging.getLogger(__name__)

_CRLF = b"\r\n"
_DATA = b"DATA\r\n"
_QUIT_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class SMTPClient:
    """One SMTP session: connect, EHLO, then any number of transactions until quit()."""

    def __init__(self) -> None:
        self._proto: ClientProtocol | None = None
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
        self.tls: TlsInfo | None = None
        """What protects the session since STARTTLS; None while in clear."""
        self._ahead: bytes | None = None
        self._then: tuple[str, list[str], bytes, list[bytes]] | None = None
        """The transaction announced ahead (sender, recipients, payload) and its commands."""
        self._sock: socket.socket | None = None

    # -- properties ------------------------------------------------------------------------------

    @property
    def announced(self) -> bool:
        """Return True when the next transaction's envelope is already on the wire."""
        return self._ahead is not None

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
        tls: TlsPolicy | None = None,
    ) -> Reply:
        """Open the session from source_address, greet, STARTTLS as tls says; return the EHLO reply.

        tls None never says STARTTLS. TLS failures raise TlsUnavailableError or TlsHandshakeError.
        """
        if not ehlo_domain or UNSAFE.search(ehlo_domain) or not ehlo_domain.isascii():
            raise ValueError(f"invalid EHLO domain {ehlo_domain!r}")
        if self._proto is not None:
            raise RuntimeError("SMTPClient.connect() called twice")
        # Before any socket: a CA file that cannot be read is a ValueError, not a host failure.
        ctx = context_for(tls) if tls is not None and tls.enabled else None
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
                why = f"timed out after {t.connect:g}s"
                raise DeliveryError(f"connect to {self._where} {why}") from None
            except OSError as exc:
                raise DeliveryError(
                    f"connect to {self._where} failed: {self._explain(exc)}"
                ) from exc
            self.local_address, self.local_port = sock.getsockname()[:2]
            proto = ClientProtocol(loop)
            await loop.create_connection(lambda: proto, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._proto = proto
        self._sock = sock
        stage, timeout = "the banner", t.banner
        try:
            banner = await self._proto_checked().reply(t.banner, "banner")
            if banner.code != 220:
                raise SMTPReplyError(banner)
            stage, timeout = "EHLO", t.ehlo
            reply = await self._greet(ehlo_domain)
            if tls is not None and ctx is not None:
                stage, timeout = "STARTTLS", t.starttls
                reply = await self._starttls(tls, ctx, ehlo_domain) or reply
            return reply
        except (OSError, ProtocolError) as exc:
            self.close()
            why = self._why(exc, stage, timeout)
            raise DeliveryError(f"session with {self._where} {why}") from exc
        except BaseException:
            self.close()
            raise

    async def _greet(self, ehlo_domain: str) -> Reply:
        """Send EHLO (HELO if EHLO is refused with 5xx) and record the extensions."""
        t = self._timeouts
        name = ehlo_domain.encode("ascii")
        self._proto_checked().write(b"EHLO " + name + _CRLF)
        reply = await self._proto_checked().reply(t.ehlo, "EHLO")
        if reply.code == 250:
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params
            return reply
        if reply.is_permanent:
            self._proto_checked().write(b"HELO " + name + _CRLF)
            reply = await self._proto_checked().reply(t.ehlo, "HELO")
            if reply.code == 250:
                return reply
        raise SMTPReplyError(reply)

    async def _starttls(
        self, policy: TlsPolicy, ctx: ssl.SSLContext, ehlo_domain: str
    ) -> Reply | None:
        """Upgrade to TLS when the peer offers it; return the EHLO reply given over TLS."""
        p, t, where = self._proto_checked(), self._timeouts, self._where
        host, addr, mode = policy.server_hostname, self.peer_address or "", policy.mode
        if "STARTTLS" not in self.extensions:
            if policy.required:
                why = f"{where} does not offer STARTTLS and the TLS mode is {mode}"
                raise TlsUnavailableError(why, host, addr)
            return None
        p.write(b"STARTTLS\r\n")
        try:
            reply = await p.reply(t.starttls, "STARTTLS")
        except (OSError, ProtocolError) as exc:
            # A peer offering STARTTLS that cannot answer it: broken TLS, as for the handshake.
            why = f"STARTTLS with {where} failed: {self._why(exc, 'STARTTLS', t.starttls)}"
            raise TlsHandshakeError(why, host, addr) from exc
        if reply.code == 421:
            raise SMTPReplyError(reply)
        if reply.code != 220:
            if policy.required:
                why = f"{where} answered STARTTLS with {reply} and the TLS mode is {mode}"
                raise TlsUnavailableError(why, host, addr)
            return None  # RFC 3207: after a refusal the session goes on as it was
        self.tls = await upgrade(p, ctx, policy, addr, where, t.starttls)
        self.extensions = {}  # RFC 3207: forget what was learnt in clear
        return await self._greet(ehlo_domain)

    # -- low level -------------------------------------------------------------------------------

    def _proto_checked(self) -> ClientProtocol:
        p = self._proto
        if p is None:
            raise ConnectionResetError("not connected")
        return p

    def _explain(self, exc: BaseException) -> str:
        """Describe a session failure for a synthesized reply."""
        if isinstance(exc, TimeoutError):
            return "timed out"
        if isinstance(exc, OSError) and exc.errno:
            # asyncio puts its own text in strerror ("Connect call failed ..."); use the OS's.
            return os.strerror(exc.errno)
        return str(exc) or type(exc).__name__

    def _why(self, exc: BaseException, stage: str, timeout: float) -> str:
        """Say how the session failed during stage."""
        if isinstance(exc, TimeoutError):
            what = stage if stage == "the banner" else f"the reply to {stage}"
            return f"timed out after {timeout:g}s waiting for {what}"
        if isinstance(exc, ProtocolError):
            return f"protocol error at {stage}: {exc}"
        return f"connection lost during {stage}: {self._explain(exc)}"

    def _failure(self, exc: BaseException, stage: str, timeout: float) -> Reply:
        """Turn a session failure during stage into a transient synthesized reply."""
        why = self._why(exc, stage, timeout)
        return synthesized(451, "4.4.2", f"kumopy: session with {self._where} {why}")

    # -- transactions ----------------------------------------------------------------------------

    def _commands(self, sender: str, recipients: list[str], payload: bytes) -> list[bytes]:
        """Return the MAIL FROM command followed by one RCPT TO per recipient."""
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        mail = b"MAIL FROM:<" + wire_address(sender, where="sender", utf8=utf8) + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(payload)
        if "8BITMIME" in self.extensions and not payload.isascii():
            mail += b" BODY=8BITMIME"
        if utf8:
            mail += b" SMTPUTF8"  # refusal() made sure the server offers it
        cmds = [mail + _CRLF]
        cmds += [b"RCPT TO:<" + wire_address(r, utf8=utf8) + b">\r\n" for r in recipients]
        return cmds

    def _refusal(self, sender: str, recipients: list[str], payload: bytes) -> Reply | None:
        """Return the permanent reply for a transaction this server cannot take, or None."""
        return refusal(self.extensions, str(self.peer_address), sender, recipients, payload)

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
        told, self._then = self._then, None
        # The transaction announced by the last call: its commands are built already.
        if told is not None and self._ahead and told[:3] == (sender, recipients, payload):
            cmds, known = told[3], True
        else:
            cmds, known = self._commands(sender, recipients, payload), False
        ahead: bytes | None = None
        if then is not None and self.pipelining and then[1] and self._refusal(*then) is None:
            with contextlib.suppress(InjectionError):
                next_cmds = self._commands(*then)
                ahead = b"".join(next_cmds) + _DATA
                self._then = (then[0], then[1], then[2], next_cmds)
        if not self.usable:
            raise DeliveryError(f"session with {self._where} is not usable")
        refused = self._refusal(sender, recipients, payload) if self._ahead is None else None
        if refused is not None:
            return TransactionResult([refused] * len(recipients))
        p = self._proto_checked()
        txn = Transaction(recipients, self._timeouts.mail_from, clear=self.tls is None)
        pipelined = self.pipelining
        ex = Exchange(p, txn, self._timeouts, cmds, payload, ahead, pipelined)
        if not pipelined:
            ex.start(cmds[0], 1)
        elif self._ahead is None:
            # RFC 2920: MAIL, every RCPT and DATA in one write.
            ex.start(b"".join(cmds) + _DATA, len(cmds) + 1)
        elif known or self._ahead == b"".join(cmds) + _DATA:
            self._ahead = None  # already on the wire behind the previous body
            ex.start(None, 0)
        else:
            self.close()
            raise RuntimeError("send_transaction() does not match the `then` announced")
        if not ex.done:
            # One wake-up for the whole transaction: the protocol drives every step.
            ex.fut = p.loop.create_future()
            try:
                await ex.fut
            finally:
                ex.finish()  # cancelled: the protocol must not drive it any further
        if ex.ahead is not None:
            self._ahead = ex.ahead
        if ex.completed:
            self.transactions += 1
        exc = ex.exc
        if exc is None:
            return txn.result()
        if isinstance(exc, OSError | ProtocolError):
            return self._broken(txn, exc)
        raise exc

    def _broken(self, txn: Transaction, exc: OSError | ProtocolError) -> TransactionResult:
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
        return txn.result(failure)

    async def rset(self) -> Reply:
        """Abort the current transaction with RSET and return the reply."""
        self._proto_checked().write(b"RSET\r\n")
        return await self._proto_checked().reply(self._timeouts.mail_from, "RSET")

    async def noop(self) -> Reply:
        """Send NOOP and return the reply."""
        self._proto_checked().write(b"NOOP\r\n")
        return await self._proto_checked().reply(self._timeouts.mail_from, "NOOP")

    async def quit(self) -> None:
        """Say QUIT politely (errors ignored), close the connection and wait until it is closed."""
        timeout = min(_QUIT_TIMEOUT, self._timeouts.idle)
        if self.usable:
            try:
                self._proto_checked().write(b"QUIT\r\n")
                await self._proto_checked().reply(timeout, "QUIT")
            except (OSError, ProtocolError) as exc:
                log.debug("QUIT to %s failed: %s", self._where, exc)
        self.close()
        p = self._proto
        if p is not None and p.transport is not None:
            # A TLS session ends with an exchange of close_notify alerts: let it finish, so that
            # the socket is closed when quit() returns.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(p.closed), timeout)

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
