"""The client side of one SMTP connection: replies in, commands out, each reply matched to one."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, cast

from kumopy.errors import ProtocolError
from kumopy.smtp.replies import RawReply, Reply, ReplyReader, reply_of

if TYPE_CHECKING:
    from kumopy.smtp.exchange import Exchange

__all__ = ["END_OF_DATA", "EXPECTED", "ClientProtocol", "Timeouts"]

END_OF_DATA = "."
"""The `command` label of the reply that follows the final dot of the message."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-step SMTP timeouts in seconds (defaults are KumoMTA's)."""

    connect: float = 60.0
    """TCP connection establishment."""
    banner: float = 60.0
    """Waiting for the 220 greeting."""
    ehlo: float = 300.0
    """Reply to EHLO or HELO."""
    starttls: float = 60.0
    """Reply to STARTTLS, and the TLS handshake that follows."""
    mail_from: float = 300.0
    """Reply to MAIL FROM."""
    rcpt_to: float = 300.0
    """Reply to each RCPT TO."""
    data: float = 300.0
    """Reply to DATA."""
    data_block: float = 180.0
    """Writing the message body."""
    data_dot: float = 300.0
    """Reply after the final dot."""
    idle: float = 5.0
    """How long an unused connection stays open."""

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Timeouts:
        """Build from a {step: seconds} mapping, ignoring steps this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in values.items() if k in known})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"timeout {f.name} must be a positive number, not {value!r}")


EXPECTED: dict[str, tuple[int, ...]] = {
    "banner": (220,),
    "EHLO": (250,),
    "HELO": (250,),
    "STARTTLS": (220,),
    "MAIL FROM": (250,),
    "RCPT TO": (250, 251),
    "DATA": (354,),
    END_OF_DATA: (250,),
    "RSET": (250,),
    "NOOP": (250,),
    "QUIT": (221,),
}
"""The positive reply each command calls for; any other positive reply is a protocol error."""


def _wake(fut: asyncio.Future[None] | None) -> None:
    """Complete a pending wait, if any."""
    if fut is not None and not fut.done():
        fut.set_result(None)


class ClientProtocol(asyncio.Protocol):
    """Collect replies from the transport and hand them to whoever waits for them.

    A transaction in progress (an Exchange, the `driver`) takes each reply as it arrives;
    otherwise reply() awaits them one by one. Either way one timer per connection bounds the
    wait: `arm` moves a deadline and the timer, when it fires, goes back to sleep until the
    deadline if that moved later, so that a step costs no timer of its own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = ReplyReader()
        self.replies: deque[RawReply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.driver: Exchange | None = None
        """The transaction that takes replies as they arrive, if one is in progress."""
        self.exc: Exception | None = None
        self.paused = False
        self.closed: asyncio.Future[None] = loop.create_future()
        # Replies owed by the server: the banner, plus one per command written. A reply beyond
        # them can only be matched to the wrong command, so it ends the session.
        self.owed = 1
        self.deadline = 0.0
        """Loop time by which the awaited reply (or drain) must come; 0.0 when none is awaited."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- the one timer ---------------------------------------------------------------------------

    def arm(self, timeout: float) -> None:
        """Start a wait of at most timeout seconds from now."""
        deadline = self.loop.time() + timeout
        self.deadline = deadline
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            # Only a deadline earlier than the sleeping timer needs a new one; a later one is
            # picked up when the timer fires.
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def disarm(self) -> None:
        """End the wait: nothing is due (the timer, if any, finds that when it fires)."""
        self.deadline = 0.0

    def _on_timer(self) -> None:
        """Expire the wait if its deadline passed, else sleep again until it."""
        self._timer = None
        deadline = self.deadline
        if not deadline:
            return
        # The loop's clock and timers are rounded to the millisecond: allow for it.
        if self.loop.time() + 0.001 < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self.deadline = 0.0
        if self.driver is not None:
            self.driver.finish(TimeoutError())
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TimeoutError())

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse replies out of the received bytes."""
        try:
            replies = self.reader.feed_raw(data)
        except ProtocolError as exc:
            self.fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if replies:
            self.owed -= len(replies)
            if self.owed < 0:
                last = reply_of(replies[-1], None)
                self.fail(
                    ProtocolError(
                        f"the server sent {-self.owed} more repl{'y' if self.owed == -1 else 'ies'}"
                        f" than commands were sent (last: {last})"
                    )
                )
                if self.transport is not None:
                    self.transport.abort()
                return
            self.replies.extend(replies)
            if self.driver is not None:
                self.driver.pump()
            else:
                _wake(self.waiter)

    def eof_received(self) -> bool:
        """Let the transport close: the peer will not send anything more."""
        self.fail(ConnectionResetError("connection closed by the peer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Record the loss and wake every waiter."""
        self.fail(exc or ConnectionResetError("connection closed"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _wake(self.closed)

    def pause_writing(self) -> None:
        """Note that the transport's write buffer is full."""
        self.paused = True

    def resume_writing(self) -> None:
        """Note that the transport's write buffer has drained."""
        self.paused = False
        if self.driver is not None:
            self.driver.resumed()

    # -- for the client --------------------------------------------------------------------------

    def fail(self, exc: Exception) -> None:
        """Remember the first failure and wake waiters so they see it."""
        if self.exc is None:
            self.exc = exc
        _wake(self.waiter)
        driver = self.driver
        if driver is not None and not driver.running:
            driver.pump()

    def write(self, data: bytes, replies: int = 1) -> None:
        """Queue bytes owing `replies` replies; raise the recorded failure if the session died."""
        p = self
        if p.transport is None:
            raise ConnectionResetError("not connected")
        if p.exc is not None:
            raise p.exc
        p.owed += replies
        p.transport.write(data)

    def check(self, raw: RawReply, command: str) -> Reply:
        """Return raw as the Reply to command; raise ProtocolError if it cannot answer it.

        A 4xx or 5xx reply is returned for the caller to act on. A positive reply other than
        the one the command calls for (250 to DATA, 354 to RCPT, ...) means the replies no
        longer line up with the commands: it raises ProtocolError, which ends the session.
        """
        reply = reply_of(raw, command)
        if reply.code == 421:
            # The server is closing the channel; nothing more may be sent on it.
            self.fail(ConnectionResetError(f"server closing the connection: {reply}"))
        elif reply.code < 400 and reply.code not in EXPECTED[command]:
            wanted = " or ".join(map(str, EXPECTED[command]))
            raise ProtocolError(f"the server answered {command} with {reply} (expected {wanted})")
        return reply

    async def reply(self, timeout: float, command: str) -> Reply:
        """Return the next reply, labelled with its command; raise on timeout, loss or a wrong code.

        For the steps outside a transaction (banner, EHLO, STARTTLS, RSET, NOOP, QUIT): see
        check() for what a wrong code does.
        """
        p = self
        if not p.replies:
            if p.exc is None:
                fut: asyncio.Future[None] = p.loop.create_future()
                p.waiter = fut
                p.arm(timeout)
                try:
                    await fut
                finally:
                    p.disarm()
                    p.waiter = None
            if not p.replies:
                raise p.exc or ConnectionResetError("connection closed")
        return p.check(p.replies.popleft(), command)
