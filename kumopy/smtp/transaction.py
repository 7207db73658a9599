"""One mail transaction's bookkeeping: the replies per recipient, refusals and rewritten replies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kumopy.smtp.replies import Reply, synthesized

__all__ = ["Transaction", "TransactionResult", "refusal", "too_many", "wants_tls"]

_TLS_WORD = re.compile(r"\b(?:START)?TLS\b", re.IGNORECASE)


@dataclass(slots=True)
class TransactionResult:
    """The outcome of one mail transaction: one reply per recipient, in order."""

    replies: list[Reply]
    """The reply deciding each recipient's fate (real or synthesized)."""
    possible_duplicate: bool = False
    """True when the body was sent but the reply after the final dot was not seen."""
    again: list[int] = field(default_factory=list)
    """Indexes of recipients refused at RCPT for being too many (RFC 5321 4.5.3.1.10): send
    them at once in another transaction; their reply (a 452) is in `replies` meanwhile."""


def wants_tls(reply: Reply) -> bool:
    """Return True for a 5xx saying the server takes mail only over TLS (RFC 3207's 530)."""
    if not reply.is_permanent:
        return False
    if reply.code == 530 or "STARTTLS" in reply.text.upper():
        return True
    return reply.enhanced_code == "5.7.0" and _TLS_WORD.search(reply.text) is not None


def too_many(reply: Reply) -> bool:
    """Return True for a refusal meaning "no more recipients in this transaction"."""
    if reply.code == 452:
        # 452 also says "mailbox full" (4.2.2) or "out of storage" (4.3.1): only the code for
        # too many recipients, or none, means "send the rest in a new transaction".
        return reply.enhanced_code in (None, "4.5.3")
    # RFC 821 gave this case 552; RFC 5321 asks clients to take that as temporary too.
    return reply.code == 552 and reply.enhanced_code == "5.5.3"


def _soften(reply: Reply, code: int, enhanced: str, why: str) -> Reply:
    """Turn a refusal into a transient reply that keeps the server's words and command."""
    return Reply(code, enhanced, f"kumopy: {why} ({reply})", reply.command)


class Transaction:
    """The state of one mail transaction while its replies come in."""

    __slots__ = ("accepted", "again", "clear", "dot_sent", "out", "recipients", "stage", "timeout")

    def __init__(self, recipients: list[str], timeout: float, clear: bool) -> None:
        self.recipients = recipients
        self.out: list[Reply | None] = [None] * len(recipients)
        """The reply deciding each recipient, once known."""
        self.accepted: list[int] = []
        """Indexes of the recipients the server accepted at RCPT."""
        self.again: list[int] = []
        """Indexes of the recipients refused for being too many."""
        self.clear = clear
        """True while the session is not protected by TLS."""
        self.stage = "MAIL FROM"
        """What the session is waiting for, named in a failure."""
        self.timeout = timeout
        self.dot_sent = False
        """True once the final dot may have reached the server (a possible duplicate)."""

    def mail(self, reply: Reply) -> Reply:
        """Record the reply to MAIL FROM: a refusal decides every recipient."""
        if not reply.is_positive:
            if self.clear and wants_tls(reply):
                # Sent in clear to a server wanting TLS: a later try may use TLS. Never bounce.
                reply = _soften(reply, 451, "4.7.0", "the server requires TLS")
            self.out = [reply] * len(self.recipients)
        return reply

    def rcpt(self, i: int, reply: Reply) -> None:
        """Record the reply to recipient i's RCPT TO."""
        if reply.is_positive:
            self.accepted.append(i)
        elif self.out[i] is None:
            if self.accepted and too_many(reply):
                # Only after an acceptance: a first recipient refused cannot be a limit.
                self.again.append(i)
                if reply.is_permanent:
                    reply = _soften(reply, 452, "4.5.3", "too many recipients in one transaction")
            elif self.clear and wants_tls(reply):
                reply = _soften(reply, 451, "4.7.0", "the server requires TLS")
            self.out[i] = reply

    def result(self, failure: Reply | None = None) -> TransactionResult:
        """Return the outcome; failure goes to every recipient still without a reply."""
        replies = [r if r is not None else failure for r in self.out]
        if None in replies:
            raise AssertionError("a recipient was left without a reply")
        dup = self.dot_sent and failure is not None
        return TransactionResult(replies, dup, self.again)  # type: ignore[arg-type]


def refusal(
    extensions: dict[str, str], peer: str, sender: str, recipients: list[str], payload: bytes
) -> Reply | None:
    """Return the permanent reply for a transaction this server cannot take, or None."""
    size = extensions.get("SIZE", "")
    limit = int(size) if size.isdigit() else 0
    if limit and len(payload) > limit:
        text = f"kumopy: message of {len(payload)} bytes exceeds the server's SIZE {limit}"
        return synthesized(552, "5.3.4", text)
    if "8BITMIME" not in extensions and not payload.isascii():
        # Converting to 7 bit would break the DKIM signature the message may carry.
        text = f"kumopy: the message has 8-bit content and {peer} does not offer 8BITMIME"
        return synthesized(554, "5.6.3", text)
    if "SMTPUTF8" not in extensions:
        for addr in (sender, *recipients):
            if not addr.isascii():
                # Downgrading would change the address (RFC 6530 rules it out): bounce.
                text = f"non-ASCII address {addr!r} needs SMTPUTF8, which {peer} does not offer"
                return synthesized(553, "5.6.7", "kumopy: " + text)
    return None
