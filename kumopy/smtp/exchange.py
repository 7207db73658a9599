"""One mail transaction driven by its replies as they arrive: a handler per awaited reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kumopy.smtp.protocol import END_OF_DATA, ClientProtocol, Timeouts
from kumopy.smtp.replies import RawReply, reply_of
from kumopy.smtp.transaction import Transaction

__all__ = ["Exchange"]

_CRLF = b"\r\n"
_DATA = b"DATA\r\n"
_RSET = b"RSET\r\n"
_DOT = b".\r\n"
_JOIN_BELOW = 65536
"""Bodies shorter than this go out in one write with the next envelope; longer ones apart."""


class Exchange:
    """Send one transaction's commands and body from the protocol's callbacks, reply by reply.

    The protocol hands over each reply (pump), the end of a full write buffer (resumed) or a
    timeout (finish); the awaiting client wakes once, when the transaction is over. Each
    handler records its reply in the Transaction, writes what comes next and names the
    following step, its timeout and its handler.
    """

    __slots__ = (
        "ahead",
        "cmds",
        "completed",
        "done",
        "draining",
        "exc",
        "fut",
        "handler",
        "i",
        "mail_ok",
        "next_envelope",
        "payload",
        "pipelined",
        "proto",
        "running",
        "t",
        "txn",
        "wait",
    )

    def __init__(
        self,
        proto: ClientProtocol,
        txn: Transaction,
        timeouts: Timeouts,
        cmds: list[bytes],
        payload: bytes,
        next_envelope: bytes | None,
        pipelined: bool,
    ) -> None:
        self.proto = proto
        self.txn = txn
        self.t = timeouts
        self.cmds = cmds
        """MAIL FROM then one RCPT TO per recipient, each with its CRLF."""
        self.payload = payload
        self.next_envelope = next_envelope
        """The next transaction's envelope, to send right behind the body (PIPELINING)."""
        self.pipelined = pipelined
        self.handler: Callable[[int, RawReply], None] = self._mail
        """What takes the next reply."""
        self.wait = timeouts.mail_from
        """The timeout of the next reply (or of the drain while `draining`)."""
        self.i = 0
        self.mail_ok = False
        self.draining = False
        """True while the body waits for room in the write buffer."""
        self.running = False
        """True while pump() runs: a failure it causes must not pump again."""
        self.done = False
        self.exc: Exception | None = None
        """Why the session failed mid-transaction; None when the transaction ran to its end."""
        self.fut: asyncio.Future[None] | None = None
        """Completed at the end, for a client that had to wait."""
        self.ahead: bytes | None = None
        """The next envelope once written: the next transaction must be that one."""
        self.completed = False
        """True once the final dot got its reply."""

    # -- driven by the protocol ------------------------------------------------------------------

    def start(self, envelope: bytes | None, owed: int) -> None:
        """Write the first commands (None: already on the wire) and take the replies so far."""
        p = self.proto
        p.driver = self
        if envelope is not None:
            try:
                p.write(envelope, owed)
            except Exception as exc:
                self.finish(exc)
                return
        self.pump()

    def pump(self) -> None:
        """Hand the replies received so far to their handlers; arm the timer for the next one."""
        p = self.proto
        replies = p.replies
        self.running = True
        try:
            while not self.done:
                if self.draining or not replies:
                    # As reply() did: the replies already received count before a failure.
                    if p.exc is not None:
                        raise p.exc
                    if not self.draining:
                        p.arm(self.wait)
                    return
                raw = replies.popleft()
                self.handler(raw[0], raw)
        except Exception as exc:
            self.finish(exc)
        finally:
            self.running = False

    def resumed(self) -> None:
        """Go on after the write buffer drained: the body is out, the final dot's reply is due."""
        if self.draining and not self.done:
            self.draining = False
            self._sent()
            self.pump()

    def finish(self, exc: Exception | None = None) -> None:
        """End the exchange (exc says why the session failed) and wake the client."""
        if self.done:
            return
        self.done = True
        self.exc = exc
        p = self.proto
        if p.driver is self:
            p.driver = None
        p.disarm()
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- one handler per reply -------------------------------------------------------------------

    def _expect(self, handler: Callable[[int, RawReply], None], stage: str, wait: float) -> None:
        """Name the next step: its handler, its stage (for errors) and its timeout."""
        self.handler = handler
        txn = self.txn
        txn.stage = stage
        txn.timeout = self.wait = wait

    def _mail(self, code: int, raw: RawReply) -> None:
        """Take the reply to MAIL FROM."""
        txn = self.txn
        if code == 250:
            self.mail_ok = True
        else:
            txn.mail(self.proto.check(raw, "MAIL FROM"))
            if not self.pipelined:
                self.finish()
                return
        self._expect(self._rcpt, "RCPT TO", self.t.rcpt_to)
        if not self.pipelined:
            self.proto.write(self.cmds[1])

    def _rcpt(self, code: int, raw: RawReply) -> None:
        """Take the reply to one RCPT TO."""
        txn, i = self.txn, self.i
        if code == 250 or code == 251:
            txn.accepted.append(i)
        else:
            txn.rcpt(i, self.proto.check(raw, "RCPT TO"))
        self.i = i = i + 1
        n = len(txn.recipients)
        if self.pipelined:
            if i < n:
                return
            if not self.mail_ok:
                txn.accepted = []
            self._expect(self._data, "DATA", self.t.data)
            return
        if txn.again:
            # The server's limit is reached: the rest go to the next transaction unasked.
            for j in range(i, n):
                txn.again.append(j)
                txn.out[j] = txn.out[i - 1]
        elif i < n:
            self.proto.write(self.cmds[i + 1])
            return
        if not txn.accepted:
            self._rset()
            return
        self._expect(self._data, "DATA", self.t.data)
        self.proto.write(_DATA)

    def _data(self, code: int, raw: RawReply) -> None:
        """Take the reply to DATA: send the body, or end the transaction."""
        txn, t, p = self.txn, self.t, self.proto
        if code != 354:
            reply = p.check(raw, "DATA")
            for i in txn.accepted:
                txn.out[i] = reply
            if self.mail_ok and code != 421:
                self._rset()
            else:
                self.finish()
            return
        self._expect(self._dot, "message body", t.data_block)
        if not txn.accepted:
            # The server wants a body nobody will receive: end it at once (RFC 2920).
            p.write(_DOT)
            self.handler = self._empty_dot
            self.wait = t.data_dot
            return
        payload, ahead = self.payload, self.next_envelope
        if txn.again:
            # Recipients refused with 452 go next in a new transaction of their own: the next
            # envelope must not be announced ahead of them.
            ahead = None
        if ahead is None:
            p.write(payload)
        else:
            owed = ahead.count(_CRLF)  # MAIL, each RCPT and DATA: one reply per line
            if len(payload) < _JOIN_BELOW:
                p.write(payload + ahead, 1 + owed)
            else:
                p.write(payload)
                p.write(ahead, owed)
            self.ahead = ahead
        if p.paused:
            self.draining = True
            p.arm(t.data_block)
        else:
            self._sent()

    def _sent(self) -> None:
        """The body left the write buffer: await the reply to the final dot."""
        self.txn.dot_sent = True
        self._expect(self._dot, "the final dot", self.t.data_dot)

    def _dot(self, code: int, raw: RawReply) -> None:
        """Take the reply to the final dot: it decides every accepted recipient."""
        txn = self.txn
        # check() only for the unusual: a 421 or a wrong positive code.
        final = reply_of(raw, END_OF_DATA) if code == 250 else self.proto.check(raw, END_OF_DATA)
        for i in txn.accepted:
            txn.out[i] = final
        self.completed = True
        self.finish()

    def _rset(self) -> None:
        """Abort the transaction with RSET; its reply ends the exchange."""
        self._expect(self._rset_reply, "RSET", self.t.mail_from)
        self.proto.write(_RSET)

    def _rset_reply(self, code: int, raw: RawReply) -> None:
        """Take the reply to RSET: only a wrong positive one matters (check raises)."""
        if code != 250:
            self.proto.check(raw, "RSET")
        self.finish()

    def _empty_dot(self, code: int, raw: RawReply) -> None:
        """Take the reply to the dot ending a body nobody receives."""
        if code != 250:
            self.proto.check(raw, END_OF_DATA)
        self.finish()
