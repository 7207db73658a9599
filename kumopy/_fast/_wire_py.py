"""Encode a message for the SMTP DATA phase (the specification; `_wire_c.pyx` mirrors it)."""

from __future__ import annotations

import re

__all__ = ["encode_data", "long_line_at"]

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


def long_line_at(data: bytes | memoryview, limit: int) -> int:
    """Return the offset of the first run of more than `limit` octets with no CR or LF, or -1.

    CR and LF each end a line here, as encode_data treats bare ones. LF-delimited lines are
    found first (most are short); only a long one is split again at CR.
    """
    body = bytes(data)
    n = len(body)
    pos = 0
    while pos < n:
        lf = body.find(b"\n", pos)
        end = n if lf < 0 else lf
        if end - pos > limit:
            start = pos
            while start < end:
                cr = body.find(b"\r", start, end)
                piece_end = end if cr < 0 else cr
                if piece_end - start > limit:
                    return start
                start = piece_end + 1
        pos = end + 1
    return -1
