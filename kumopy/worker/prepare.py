"""A job made ready for the wire: envelope checks, recipient batches, the encoded body once."""

from __future__ import annotations

from kumopy.errors import InjectionError
from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, RecipientResult
from kumopy.smtp.replies import Reply, synthesized
from kumopy.smtp.wire import ascii_domain, encode_data, wire_address

__all__ = ["Prepared", "prepare", "result_for", "status_of"]


def status_of(reply: Reply) -> str:
    """Map a reply to DELIVERED, TRANSIENT or PERMANENT."""
    if reply.code < 400:
        return DELIVERED
    return PERMANENT if reply.code >= 500 else TRANSIENT


def result_for(recipient: str, reply: Reply) -> RecipientResult:
    """Build one recipient's result from the reply that decided it."""
    return RecipientResult(
        recipient, status_of(reply), reply.code, reply.enhanced_code, reply.text, reply.command
    )


class Prepared:
    """A job ready for the wire: early results, recipient batches and the encoded body."""

    __slots__ = ("batches", "job", "payload", "results", "sender", "wire")

    def __init__(
        self,
        job: Job,
        results: list[RecipientResult | None],
        batches: list[list[int]],
        payload: bytes,
        sender: str = "",
        wire: list[str] | None = None,
    ) -> None:
        self.job = job
        self.results = results
        """One slot per recipient; filled early for addresses that cannot go on the wire."""
        self.batches = batches
        """Indexes of the recipients to send, max_recipients_per_batch per transaction."""
        self.payload = payload
        self.sender = sender
        """The sender as it goes on the wire (a U-label domain as its A-label)."""
        self.wire = wire or []
        """Each recipient as it goes on the wire, by index."""

    def rcpts(self, batch: list[int]) -> list[str]:
        """Return the wire forms of a batch of recipient indexes."""
        return [self.wire[i] for i in batch]


def prepare(job: Job, batch_size: int) -> Prepared:
    """Check the envelope, encode the body once and split recipients into batches."""
    results: list[RecipientResult | None] = [None] * len(job.recipients)
    todo: list[int] = []
    sender = ascii_domain(job.sender)
    try:
        # UTF-8 passes here; the session refuses it (5.6.7) when the peer lacks SMTPUTF8.
        wire_address(sender, where="sender", utf8=True)
    except InjectionError as exc:
        bad = synthesized(553, "5.1.7", f"kumopy: {exc.message}")
        return Prepared(job, [result_for(r, bad) for r in job.recipients], [], b"")
    wire = [ascii_domain(r) for r in job.recipients]
    for i, rcpt in enumerate(wire):
        try:
            wire_address(rcpt, utf8=True)
        except InjectionError as exc:
            reply = synthesized(553, "5.1.3", f"kumopy: {exc.message}")
            results[i] = result_for(job.recipients[i], reply)
        else:
            todo.append(i)
    if not todo:
        return Prepared(job, results, [], b"")
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return Prepared(job, results, batches, encode_data(job.data), sender, wire)
