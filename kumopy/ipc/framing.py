"""Encode and decode kumopy's ZeroMQ messages: a msgpack header frame plus raw body frames."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from kumopy.errors import KumoError, ProtocolError

__all__ = [
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "body_frame",
    "decode_header",
    "encode_header",
    "error_reply",
    "ok_reply",
]

PROTOCOL_VERSION = 1
"""The wire protocol version every header carries as `v`."""

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A header frame larger than this is refused before it is decoded."""

# One packer per process: msgpack's Packer keeps a reusable buffer.
_packer = msgpack.Packer(use_bin_type=True)


def encode_header(kind: str, **fields: Any) -> bytes:
    """Pack a header with the protocol version and kind tag."""
    fields["v"] = PROTOCOL_VERSION
    fields["kind"] = kind
    packed: bytes = _packer.pack(fields)
    return packed


def decode_header(
    frame: bytes | memoryview, *, max_bytes: int = MAX_HEADER_BYTES
) -> dict[str, Any]:
    """Decode and check one header frame; raise ProtocolError saying what is wrong."""
    size = len(frame)
    if size > max_bytes:
        raise ProtocolError(f"header frame of {size} bytes exceeds the {max_bytes}-byte limit")
    if size == 0:
        raise ProtocolError("empty header frame")
    try:
        # Explicit per-type limits: a hostile frame cannot make the decoder allocate more than
        # the frame itself could describe.
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=1_000_000,
            max_map_len=100_000,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"header frame is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"header must be a msgpack map, not {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this coordinator speaks {PROTOCOL_VERSION})"
        )
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("header has no 'kind' string")
    return obj


def ok_reply(req: Any, result: Any = None) -> bytes:
    """Pack the uniform success envelope for request `req`."""
    return encode_header("reply", req=req, ok=True, result=result)


def error_reply(req: Any, error: KumoError | str, code: str | None = None) -> bytes:
    """Pack the uniform failure envelope for request `req`."""
    if isinstance(error, KumoError):
        err = error.to_dict()
    else:
        err = {"type": "KumoError", "code": code or "error", "message": error, "transient": False}
    if code:
        err["code"] = code
    return encode_header("reply", req=req, ok=False, error=err)


def body_frame(frames: Sequence[Any], index: Any) -> Any:
    """Return body frame `index` of a multipart message, checking the index."""
    if type(index) is not int or not 0 < index < len(frames):
        raise ProtocolError(f"data refers to frame {index!r}, but the request has {len(frames)}")
    return frames[index]
