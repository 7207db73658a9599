# cython: language_level=3
"""Encode a message for the SMTP DATA phase in one pass over its lines (mirrors _wire_py)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memchr, memcpy

__all__ = ["encode_data", "long_line_at"]


cdef Py_ssize_t _encode(const unsigned char* p, Py_ssize_t n, unsigned char* out) noexcept:
    # With out == NULL only measure; otherwise write. Line ends are found with memchr, which
    # scans at memory speed; the next CR and the next LF are each looked up once, not per line.
    cdef Py_ssize_t i = 0, size = 0, e, length, cr = -1, lf = -1
    cdef const void* hit
    cdef bint ended = False
    while i < n:
        if p[i] == b".":
            # A line starting with a dot gets one more (RFC 5321 4.5.2).
            if out != NULL:
                out[size] = b"."
            size += 1
        if cr < i:
            hit = memchr(p + i, b"\r", n - i)
            cr = (<const unsigned char*>hit - p) if hit != NULL else n
        if lf < i:
            hit = memchr(p + i, b"\n", n - i)
            lf = (<const unsigned char*>hit - p) if hit != NULL else n
        e = cr if cr < lf else lf
        length = e - i
        if out != NULL:
            memcpy(out + size, p + i, length)
        size += length
        if e == n:
            ended = False
            break
        # CRLF, bare CR and bare LF all end the line with CRLF.
        if out != NULL:
            out[size] = b"\r"
            out[size + 1] = b"\n"
        size += 2
        ended = True
        i = e + 2 if (p[e] == b"\r" and e + 1 < n and p[e + 1] == b"\n") else e + 1
    if not ended:
        if out != NULL:
            out[size] = b"\r"
            out[size + 1] = b"\n"
        size += 2
    if out != NULL:
        out[size] = b"."
        out[size + 1] = b"\r"
        out[size + 2] = b"\n"
    return size + 3


def encode_data(data):
    """Return the DATA payload as sent: CRLF line endings, dot-stuffed, ending with CRLF.CRLF."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t n = view.shape[0]
    if n == 0:
        # The CRLF that ends the DATA command line is the first half of the terminator.
        return b".\r\n"
    cdef const unsigned char* p = &view[0]
    cdef Py_ssize_t size = _encode(p, n, NULL)
    result = PyBytes_FromStringAndSize(NULL, size)
    _encode(p, n, <unsigned char*>PyBytes_AS_STRING(result))
    return result


def long_line_at(data, Py_ssize_t limit):
    """Return the offset of the first run of more than `limit` octets with no CR or LF, or -1.

    CR and LF each end a line here, as encode_data treats bare ones. LF-delimited lines are
    found first (most are short); only a long one is split again at CR.
    """
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t n = view.shape[0]
    if n == 0:
        return -1
    cdef const unsigned char* p = &view[0]
    cdef const unsigned char* hit
    cdef Py_ssize_t pos = 0, end, start, piece_end
    while pos < n:
        # memchr scans at memory speed: a 100 KB body of short lines costs microseconds.
        hit = <const unsigned char*>memchr(p + pos, 10, n - pos)
        end = n if hit == NULL else hit - p
        if end - pos > limit:
            start = pos
            while start < end:
                hit = <const unsigned char*>memchr(p + start, 13, end - start)
                piece_end = end if hit == NULL else hit - p
                if piece_end - start > limit:
                    return start
                start = piece_end + 1
        pos = end + 1
    return -1
