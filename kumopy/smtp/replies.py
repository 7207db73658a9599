"""SMTP replies: the Reply value, parsing of (multi-line) replies, and an incremental reader."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kumopy.errors import ProtocolError

__all__ = [
    "MAX_LINE",
    "MAX_LINES",
    "RawReply",
    "Reply",
    "ReplyReader",
    "parse_reply",
    "reply_of",
    "synthesized",
]

MAX_LINE = 8192
"""Longest reply line accepted (RFC 5321 asks for 512; real servers send longer)."""
MAX_LINES = 512
"""Most lines accepted in one multi-line reply."""

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, optional enhanced status code, text and the command it answered."""

    code: int
    """Three-digit reply code."""
    enhanced_code: str | None
    """RFC 3463 enhanced status code such as "4.2.1", when the server sent one."""
    text: str
    """Reply text without codes; lines of a multi-line reply joined with "\\n"."""
    command: str | None = None
    """The command answered ("MAIL FROM", "RCPT TO", "DATA", ...), None if synthesized."""

    @property
    def is_positive(self) -> bool:
        """Return True for a 2xx or 3xx reply."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """Return True for a 4xx reply (try again later)."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """Return True for a 5xx reply (do not retry)."""
        return self.code >= 500

    def with_command(self, command: str | None) -> Reply:
        """Return this reply labelled with the command it answered."""
        return Reply(self.code, self.enhanced_code, self.text, command)

    def __str__(self) -> str:
        enh = f" {self.enhanced_code}" if self.enhanced_code else ""
        return f"{self.code}{enh} {self.text}"


RawReply = tuple[int, bytes | Reply]
"""A reply as ReplyReader.feed_raw returns it: its code, then its one line or its parsed Reply."""


def synthesized(code: int, enhanced_code: str | None, text: str) -> Reply:
    """Build a reply kumopy makes up itself (no command: the peer never sent it)."""
    return Reply(code, enhanced_code, text, None)


def _split_line(line: bytes) -> tuple[int, bool, str]:
    """Return (code, is_last, text) of one reply line; raise ProtocolError if malformed."""
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    head = line[:3]
    sep = line[3:4]
    if len(head) != 3 or not head.isdigit() or sep not in (b" ", b"-", b""):
        shown = line[:80].decode("ascii", "backslashreplace")
        raise ProtocolError(f"malformed SMTP reply line: {shown!r}")
    code = int(head)
    if not 200 <= code <= 599:
        raise ProtocolError(f"SMTP reply code out of range: {code}")
    text = line[4:].decode("utf-8", "replace")
    return code, sep != b"-", text


def reply_of(raw: RawReply, command: str | None) -> Reply:
    """Build the Reply of a raw reply from ReplyReader.feed_raw, labelled with its command."""
    code, body = raw
    if not isinstance(body, bytes):
        return Reply(code, body.enhanced_code, body.text, command)
    # A single line, its code already checked: decoded only now, as most replies are not kept.
    text = body[4:].rstrip(b"\r\n").decode("utf-8", "replace")
    m = _ENHANCED.match(text)
    if m is not None and int(m.group(1)) == code // 100:
        return Reply(code, text[: m.end()].rstrip(), text[m.end() :], command)
    return Reply(code, None, text, command)


def parse_reply(lines: list[bytes]) -> Reply:
    """Parse the lines of one reply (with or without line endings) into a Reply."""
    if not lines:
        raise ProtocolError("empty SMTP reply")
    code = 0
    texts: list[str] = []
    for i, raw in enumerate(lines):
        line_code, last, text = _split_line(raw)
        if i == 0:
            code = line_code
        elif line_code != code:
            raise ProtocolError(f"SMTP reply mixes codes {code} and {line_code}")
        if last != (i == len(lines) - 1):
            raise ProtocolError("SMTP reply continuation marks do not match its lines")
        texts.append(text)
    enhanced: str | None = None
    m = _ENHANCED.match(texts[0])
    if m is not None and int(m.group(1)) == code // 100:
        enhanced = m.group(0).rstrip()
        prefix_len = len(enhanced)
        # Servers usually repeat the enhanced code on every line; strip it wherever it is.
        texts = [t[prefix_len:].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


class ReplyReader:
    """Split a byte stream from the server into complete replies."""

    __slots__ = ("_buf", "_lines")

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[bytes] = []

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; return the replies they complete, in order."""
        return [reply_of(raw, None) for raw in self.feed_raw(data)]

    def feed_raw(self, data: bytes) -> list[RawReply]:
        """Add received bytes; return the replies they complete as (code, line or Reply)."""
        buf = self._buf + data if self._buf else data
        out: list[RawReply] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start : end + 1]
            start = end + 1
            if len(line) > MAX_LINE:
                raise ProtocolError(f"SMTP reply line longer than {MAX_LINE} bytes")
            # Fast path: a complete single-line reply, by far the common case. Only its code is
            # read here; reply_of() decodes the text of the few replies that are kept.
            if not self._lines and line[3:4] == b" ":
                head = line[:3]
                if not head.isdigit() or not 200 <= int(head) <= 599:
                    parse_reply([line])  # raises the detailed ProtocolError
                out.append((int(head), line))
                continue
            self._lines.append(line)
            if line[3:4] != b"-":
                lines, self._lines = self._lines, []
                reply = parse_reply(lines)
                out.append((reply.code, reply))
            elif len(self._lines) > MAX_LINES:
                raise ProtocolError(f"SMTP reply with more than {MAX_LINES} lines")
        self._buf = buf[start:]
        if len(self._buf) > MAX_LINE:
            raise ProtocolError(f"SMTP reply line longer than {MAX_LINE} bytes")
        return out

    @property
    def pending(self) -> bool:
        """Return True when part of a reply has been received but not completed."""
        return bool(self._buf or self._lines)
