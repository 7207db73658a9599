"""Encode a message for the SMTP DATA phase (the specification; `_wire_c.pyx` mirrors it)."""

from __future__ import annotations

import re

__all__ = ["encode_data"]

_EOL = re.compile(rb"\r\n|\r|\n")
_TERMINATOR = b".\r\n"


def encode_data(data: bytes | memoryview) -> bytes:
    """Return the DATA payload as sent: CRLF line endings, dot-stuffed, ending with CRLF.CRLF."""
    body = bytes(data)
    if not body:
        # The CRLF that ends the DATA command line is the first half of the terminator.
        return _TERMINATOR
    crlf = body.count(b"\r\n")
    # Counting is a C-speed scan; the regex only runs when a lone CR or LF exists.
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        body = _EOL.sub(b"\r\n", body)
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    if body[:1] == b".":
        body = b"." + body
    if body[-2:] != b"\r\n":
        return body + b"\r\n" + _TERMINATOR
    return body + _TERMINATOR
