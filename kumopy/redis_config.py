"""The policy's Redis throttles settings checked, and node URLs masked for logs and status."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from kumopy.errors import kind_of
from kumopy.units import duration_seconds

__all__ = ["REDIS_URL_HELP", "check_node", "mask_url", "throttle_settings"]

REDIS_URL_HELP = (
    'a URL like "redis://127.0.0.1:6379", "rediss://user:password@host:6380/0" '
    'or "unix:///run/redis/redis.sock"'
)
_QUERY_SECRET = re.compile(r"(?i)\b(password=)[^&#]*")


def mask_url(url: str) -> str:
    """Return url with its password (in the user part or the query) replaced by ***."""
    try:
        parts = urlsplit(url)
        secret = parts.password
    except ValueError:
        return "<a URL that cannot be parsed>"
    if secret is not None:
        user, _, host = parts.netloc.rpartition("@")
        url = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()
    return _QUERY_SECRET.sub(r"\1***", url)


def check_node(value: object) -> str:
    """Return value if it names one Redis node; raise ValueError (never showing a password)."""
    if isinstance(value, list | tuple):
        raise ValueError(f"node must be one URL (kumopy uses one Redis node), not {kind_of(value)}")
    if not isinstance(value, str):
        raise ValueError(f"node must be {REDIS_URL_HELP}, not {kind_of(value)}")
    shown = mask_url(value)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as exc:
        raise ValueError(f"node {shown!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"node {shown!r} must be {REDIS_URL_HELP}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"node {shown!r} names no socket path")
    elif not parts.hostname:
        raise ValueError(f"node {shown!r} names no host")
    else:
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"node {shown!r}: the database {db!r} must be a number")
    return value.strip()


def throttle_settings(options: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Check configure_redis_throttles' options; return the settings (None if bad), problems."""
    known = ("node", "prefix", "timeout")
    problems = [
        f"unknown option {k!r}; use {', '.join(known)} (credentials go in the node URL)"
        for k in options
        if k not in known
    ]
    try:
        node = check_node(options.get("node"))
        seconds = duration_seconds(options.get("timeout", "1s"))
        if seconds <= 0:
            raise ValueError("timeout must be longer than zero")
        prefix = options.get("prefix")
        if prefix is not None and not (isinstance(prefix, str) and prefix.isidentifier()):
            raise ValueError(f"prefix must be a name like 'cluster_a', not {prefix!r}")
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        return None, problems
    return {"node": node, "prefix": prefix, "timeout": seconds}, []
