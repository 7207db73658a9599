"""Egress sources, pools and queue configs as frozen dataclasses, and their validation."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kumopy.errors import ConfigError, ConfigIssue

__all__ = [
    "MAX_WEIGHT",
    "RESERVED_SOURCE_OPTIONS",
    "SOURCE_OPTIONS",
    "UNSPECIFIED",
    "Config",
    "EgressPool",
    "EgressSource",
    "EntryDefinition",
    "MxHost",
    "PoolDefinition",
    "PoolEntry",
    "QueueConfig",
    "SourceDefinition",
    "build_config",
    "parse_duration",
    "parse_mx_host",
    "queue_name",
]

UNSPECIFIED = "unspecified"
"""Name of the built-in source (no bind, host name as EHLO) and of the pool holding only it."""
SOURCE_OPTIONS = ("source_address", "ehlo_domain", "remote_port")
"""Egress source options kumopy implements, besides `name`."""
RESERVED_SOURCE_OPTIONS = (
    "ha_proxy_server",
    "ha_proxy_source_address",
    "socks5_proxy_server",
    "socks5_proxy_source_address",
    "socks5_proxy_username",
    "socks5_proxy_password",
    "suspend_when_unplumbed",
)
"""KumoMTA source options that kumopy recognises but does not implement yet."""
MAX_WEIGHT = 2**32 - 1
"""Largest pool entry weight; weights are ratios, so small numbers are the norm."""

_NAME_MAX_BYTES = 255  # the source name is the worker's ZeroMQ identity, limited to 255 bytes


@dataclass(frozen=True, slots=True)
class EgressSource:
    """One way out of the host: the address to bind and the name to announce in EHLO."""

    name: str
    """Used in logs, metrics, ready-queue names and as the worker's identity."""
    source_address: str | None = None
    """Normalised IPv4 or IPv6 literal to bind before connecting; None lets the kernel choose."""
    ehlo_domain: str | None = None
    """Name sent with EHLO; None means the host name."""
    remote_port: int | None = None
    """Destination port overriding the mx_list port and 25."""

    @property
    def family(self) -> str | None:
        """Return "ipv4" or "ipv6" for the source address, or None when there is none."""
        if self.source_address is None:
            return None
        return "ipv6" if ":" in self.source_address else "ipv4"

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe dict that from_dict() turns back into this source."""
        return {
            "name": self.name,
            "source_address": self.source_address,
            "ehlo_domain": self.ehlo_domain,
            "remote_port": self.remote_port,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressSource:
        """Rebuild a source from to_dict(), validating it again; raise ConfigError if invalid."""
        options = {k: v for k, v in data.items() if k != "name"}
        name = data.get("name")
        problem = _name_problem(name)
        if problem is not None:
            raise ConfigError([ConfigIssue("message", _describe("source", name), "name", problem)])
        assert isinstance(name, str)
        source, issues = _make_source(SourceDefinition(name, options, "message"))
        if source is None:
            raise ConfigError(issues)
        return source


@dataclass(frozen=True, slots=True)
class PoolEntry:
    """One source of a pool with its weight."""

    name: str
    """Name of an egress source."""
    weight: int = 1
    """Relative share of the pool's messages; always >= 1 here (weight 0 entries are dropped)."""


@dataclass(frozen=True, slots=True)
class EgressPool:
    """A named set of weighted sources that messages are spread over."""

    name: str
    """Named by a queue config's egress_pool."""
    entries: tuple[PoolEntry, ...]
    """Entries in definition order, weight-0 entries already removed; may be empty."""


@dataclass(frozen=True, slots=True)
class MxHost:
    """One smart host of an mx_list: a host name or IP literal, and an optional port."""

    host: str
    """Host name (lower case) or normalised IP literal, without brackets."""
    port: int | None = None
    """Port to connect to; None means the source's remote_port or 25."""

    def __str__(self) -> str:
        if self.port is None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """What get_queue_config decides for one scheduled queue."""

    egress_pool: str = UNSPECIFIED
    """Pool whose sources send this queue's messages."""
    retry_interval: float = 1200.0
    """Seconds before the first retry; doubles at each attempt."""
    max_retry_interval: float | None = None
    """Cap in seconds on the retry delay; None means no cap."""
    max_age: float = 604800.0
    """Seconds after reception when an undelivered message expires."""
    mx_list: tuple[MxHost, ...] | None = None
    """Smart hosts to use instead of an MX lookup; None means look up MX records."""


def queue_name(domain: str, tenant: str | None, campaign: str | None) -> str:
    """Name a scheduled queue `campaign:tenant@domain`, leaving out absent parts."""
    name = f"{tenant}@{domain}" if tenant else domain
    return f"{campaign}:{name}" if campaign else name


@dataclass(frozen=True, slots=True)
class Config:
    """A validated set of sources and pools, including the built-in `unspecified` ones."""

    sources: Mapping[str, EgressSource]
    """Read-only, in definition order, `unspecified` first."""
    pools: Mapping[str, EgressPool]
    """Read-only, in definition order, `unspecified` first."""

    def used_sources(self) -> list[EgressSource]:
        """Return the sources some pool sends from, plus `unspecified`, in definition order."""
        used = {entry.name for pool in self.pools.values() for entry in pool.entries}
        used.add(UNSPECIFIED)
        return [source for name, source in self.sources.items() if name in used]

    @classmethod
    def default(cls) -> Config:
        """Return the configuration with only the built-in source and pool."""
        return build_config((), ())


@dataclass(slots=True)
class SourceDefinition:
    """A source as written by the operator, not yet validated (kept mutable to merge files)."""

    name: object
    """The name as given; validated by build_config."""
    options: dict[str, object]
    """Every other option as given, None meaning unset."""
    where: str
    """`file:line` of the definition."""
    option_where: dict[str, str] = field(default_factory=dict)
    """`file:line` of single options when they differ from `where` (merged sources files)."""


@dataclass(slots=True)
class EntryDefinition:
    """One pool entry as written by the operator."""

    value: object
    """Normally a mapping with `name` and optional `weight`."""
    label: str
    """How to name the entry in messages, e.g. `entries[1]` or `entry "mta-a"`."""
    where: str
    """`file:line` of the entry."""


@dataclass(slots=True)
class PoolDefinition:
    """A pool as written by the operator, not yet validated."""

    name: object
    """The name as given."""
    entries: list[EntryDefinition]
    """Entries in the order given."""
    where: str
    """`file:line` of the definition."""
    extra: dict[str, object] = field(default_factory=dict)
    """Options other than name and entries (each is reported as an error)."""
    entries_problem: str | None = None
    """Set when `entries` was not a list at all."""


class _Invalid(Exception):
    """A value failed validation; the argument is the problem, worded for an operator."""


def _kind(value: object) -> str:
    """Return a short description of a value's type for error messages."""
    if value is None:
        return "nothing (None)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _describe(kind: str, name: object) -> str:
    """Return how an object is named in messages, e.g. `source "ip-1"`."""
    if isinstance(name, str) and name:
        return f'{kind} "{name}"'
    return f"{kind} (no valid name)"


def _suggest(word: str, choices: Iterable[str]) -> str:
    """Return a "did you mean" hint for a misspelt word, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _name_problem(value: object) -> str | None:
    """Return why a source or pool name is unusable, or None."""
    if value is None:
        return "a name is required"
    if not isinstance(value, str):
        return f"name must be a string, not {_kind(value)}"
    if not value:
        return "name must not be empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return f"name {value!r} must not contain spaces or control characters"
    if len(value.encode()) > _NAME_MAX_BYTES:
        return f"name is longer than {_NAME_MAX_BYTES} bytes"
    return None


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _hostname_problem(text: str) -> str | None:
    """Return why text is not a valid DNS host name, or None."""
    if not text:
        return "must not be empty"
    if not text.isascii():
        return f"{text!r} is not ASCII; write an internationalised name in its xn-- form"
    if len(text) > 253:
        return f"{text[:40]!r}... is longer than 253 characters"
    for label in text.split("."):
        if not label:
            return f"{text!r} has an empty label (two dots in a row or a leading dot)"
        if len(label) > 63:
            return f"{text!r} has a label longer than 63 characters"
        if not _LABEL.fullmatch(label):
            return (
                f"{text!r} has an invalid label {label!r}: use letters, digits and hyphens, "
                "not starting or ending with a hyphen"
            )
    return None


def _source_address(value: object) -> str:
    """Return the normalised source address or raise _Invalid."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = value
    elif not isinstance(value, str):
        raise _Invalid(f"must be an IP address string, not {_kind(value)}")
    else:
        text = value.strip()
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise _Invalid(_address_hint(text)) from None
    if ip.is_unspecified:
        raise _Invalid(f"{ip} means any address; omit source_address to let the kernel choose")
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise _Invalid(f"{ip} is a multicast or broadcast address and cannot send mail")
    return str(ip)


def _address_hint(text: str) -> str:
    """Explain why text is not an IP literal, guessing what the operator meant."""
    if "/" in text:
        return f"{text!r} is a network; give one address"
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host.count(":") == 0:
        return f"{text!r} has a port; give only the address (remote_port sets the destination port)"
    if _hostname_problem(text.rstrip(".")) is None and not text.replace(".", "").isdigit():
        return (
            "source_address must be an IP literal, not a host name; resolve it yourself and "
            f"give the address (kumopy never resolves names to bind): {text!r}"
        )
    return f"{text!r} is not a valid IPv4 or IPv6 address"


def _ehlo_domain(value: object) -> str:
    """Return the EHLO name or raise _Invalid."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a host name string, not {_kind(value)}")
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        tagged = inner[:5].lower() == "ipv6:"
        try:
            ip = ipaddress.ip_address(inner[5:] if tagged else inner)
        except ValueError:
            raise _Invalid(f"{value!r} is not a valid address literal") from None
        if (ip.version == 6) != tagged:
            raise _Invalid(f"write an IPv6 address literal as [IPv6:{ip}] and IPv4 as [a.b.c.d]")
        return value
    if value.endswith("."):
        raise _Invalid(f"{value!r} ends with a dot; remove it")
    problem = _hostname_problem(value)
    if problem is not None:
        raise _Invalid(problem)
    if "." not in value:
        raise _Invalid(
            f"{value!r} is not a fully-qualified name such as mta1.example.com; many "
            "receivers refuse a single-label EHLO name"
        )
    if value.rsplit(".", 1)[1].isdigit():
        raise _Invalid(f"{value!r} looks like an IP address; write it as [{value}]")
    return value


def _port(value: object) -> int:
    """Return a TCP port number or raise _Invalid."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be a whole number from 1 to 65535, not {_kind(value)}")
    if not 1 <= value <= 65535:
        raise _Invalid(f"{value} is not a port number (1 to 65535)")
    return value


def _make_source(definition: SourceDefinition) -> tuple[EgressSource | None, list[ConfigIssue]]:
    """Validate the options of a named source definition; return the source or the issues."""
    assert isinstance(definition.name, str)
    obj = _describe("source", definition.name)
    issues: list[ConfigIssue] = []
    values: dict[str, Any] = {}
    for key, value in definition.options.items():
        where = definition.option_where.get(key, definition.where)
        if key in RESERVED_SOURCE_OPTIONS:
            # The value is never echoed: it may be a proxy password.
            issues.append(ConfigIssue(where, obj, key, "not supported yet by kumopy; remove it"))
            continue
        if key not in SOURCE_OPTIONS:
            known = ("name", *SOURCE_OPTIONS)
            hint = _suggest(str(key), (*known, *RESERVED_SOURCE_OPTIONS))
            problem = f"unknown option{hint}; known options: {', '.join(known)}"
            issues.append(ConfigIssue(where, obj, str(key), problem))
            continue
        if value is None:
            continue
        try:
            if key == "source_address":
                values[key] = _source_address(value)
            elif key == "ehlo_domain":
                values[key] = _ehlo_domain(value)
            else:
                values[key] = _port(value)
        except _Invalid as exc:
            issues.append(ConfigIssue(where, obj, key, str(exc)))
    if issues:
        return None, issues
    return EgressSource(definition.name, **values), []


def _weight(value: object) -> int:
    """Return a pool entry weight or raise _Invalid."""
    if value is None:
        return 1
    if isinstance(value, bool):
        raise _Invalid("must be a whole number >= 0, not a boolean")
    if isinstance(value, float):
        raise _Invalid(f"must be a whole number >= 0, not {value!r}; weights are ratios")
    if not isinstance(value, int):
        raise _Invalid(f"must be a whole number >= 0, not {_kind(value)} ({value!r})")
    if value < 0:
        raise _Invalid(f"{value} is negative; use 0 to drop the entry")
    if value > MAX_WEIGHT:
        raise _Invalid(f"{value} is larger than {MAX_WEIGHT}")
    return value


def _make_pool(
    definition: PoolDefinition, obj: str, known: set[str], issues: list[ConfigIssue]
) -> EgressPool | None:
    """Validate a named pool definition against the known source names."""
    before = len(issues)
    for key in definition.extra:
        hint = _suggest(str(key), ("name", "entries"))
        message = f"unknown option{hint}; a pool takes name and entries"
        issues.append(ConfigIssue(definition.where, obj, str(key), message))
    if definition.entries_problem is not None:
        issues.append(ConfigIssue(definition.where, obj, "entries", definition.entries_problem))
    entries: list[PoolEntry] = []
    seen: dict[str, str] = {}
    for entry in definition.entries:
        value = entry.value
        if isinstance(value, PoolEntry):
            value = {"name": value.name, "weight": value.weight}
        if not isinstance(value, Mapping):
            shape = f'must be a table like {{"name": "ip-1", "weight": 1}}, not {_kind(value)}'
            issues.append(ConfigIssue(entry.where, obj, entry.label, shape))
            continue
        for key in value:
            if key not in ("name", "weight"):
                hint = _suggest(str(key), ("name", "weight"))
                unknown = f"unknown option{hint}; an entry takes name and weight"
                issues.append(ConfigIssue(entry.where, obj, f"{entry.label}.{key}", unknown))
        name = value.get("name")
        problem = _name_problem(name)
        if problem is None and name not in known:
            problem = f"unknown source {name!r}{_suggest(str(name), known)}; define it first"
        elif problem is None and name in seen:
            problem = f"source {name!r} is already in this pool as {seen[name]}"
        if problem is not None:
            issues.append(ConfigIssue(entry.where, obj, f"{entry.label}.name", problem))
        else:
            assert isinstance(name, str)
            seen[name] = entry.label
        try:
            weight = _weight(value.get("weight"))
        except _Invalid as exc:
            issues.append(ConfigIssue(entry.where, obj, f"{entry.label}.weight", str(exc)))
            continue
        if problem is None and weight > 0:
            assert isinstance(name, str)
            entries.append(PoolEntry(name, weight))
    if len(issues) > before:
        return None
    assert isinstance(definition.name, str)
    return EgressPool(definition.name, tuple(entries))


_BUILTIN_SOURCE = EgressSource(UNSPECIFIED)
_BUILTIN_POOL = EgressPool(UNSPECIFIED, (PoolEntry(UNSPECIFIED, 1),))


def _claim_name(
    kind: str, name: object, where: str, first: dict[str, str], issues: list[ConfigIssue]
) -> str | None:
    """Check a definition's name is valid and new; return it, or None after recording why not."""
    obj = _describe(kind, name)
    problem = _name_problem(name)
    if problem is None and name == UNSPECIFIED:
        problem = (
            f'"{UNSPECIFIED}" is the built-in {kind} and cannot be redefined; pick another name'
        )
    elif problem is None and isinstance(name, str) and name in first:
        problem = f"{kind} {name!r} is defined twice: at {first[name]} and at {where}"
    if problem is not None:
        issues.append(ConfigIssue(where, obj, "name", problem))
        return None
    assert isinstance(name, str)
    first[name] = where
    return name


def build_config(
    sources: Iterable[SourceDefinition],
    pools: Iterable[PoolDefinition],
    issues: Iterable[ConfigIssue] = (),
) -> Config:
    """Validate every definition; return the Config or raise one ConfigError listing all issues."""
    found = list(issues)
    source_map: dict[str, EgressSource] = {UNSPECIFIED: _BUILTIN_SOURCE}
    # Names of invalid sources still count as known, so one mistake is reported once.
    known: set[str] = {UNSPECIFIED}
    first: dict[str, str] = {}
    for definition in sources:
        name = _claim_name("source", definition.name, definition.where, first, found)
        if name is None:
            continue
        known.add(name)
        source, problems = _make_source(definition)
        found.extend(problems)
        if source is not None:
            source_map[name] = source
    pool_map: dict[str, EgressPool] = {UNSPECIFIED: _BUILTIN_POOL}
    first = {}
    for pool_def in pools:
        name = _claim_name("pool", pool_def.name, pool_def.where, first, found)
        if name is None:
            continue
        pool = _make_pool(pool_def, _describe("pool", name), known, found)
        if pool is not None:
            pool_map[name] = pool
    if found:
        raise ConfigError(found)
    return Config(MappingProxyType(source_map), MappingProxyType(pool_map))


_UNITS = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("", "s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")
_DURATION_HELP = 'a number of seconds or a string such as "90s", "20m", "1h30m" or "7d"'


def _duration(value: object) -> float:
    """Return a duration in seconds or raise _Invalid."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(f"must be {_DURATION_HELP}, not {_kind(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        parts: list[re.Match[str]] = []
        while len(parts) == 0 or parts[-1].end() < len(text):
            match = _DURATION_PART.match(text, parts[-1].end() if parts else 0)
            if match is None:
                raise _Invalid(f"{value!r} is not {_DURATION_HELP}")
            parts.append(match)
        if len(parts) > 1 and any(not m.group(2) for m in parts):
            raise _Invalid(f"{value!r} has a number without a unit")
        seconds = 0.0
        for match in parts:
            unit = match.group(2)
            if unit not in _UNITS:
                raise _Invalid(f"{value!r} has an unknown unit {unit!r}; use s, m, h, d or w")
            seconds += float(match.group(1)) * _UNITS[unit]
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise _Invalid(f"{value} is too large") from None
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise _Invalid(f"{value!r} must be a finite duration >= 0")
    return seconds


def parse_duration(value: object, where: str = "duration") -> float:
    """Return value as seconds; accept int/float seconds or "90s", "20m", "1h30m", "7d", ..."""
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ConfigError([ConfigIssue(where, repr(value), "", str(exc))]) from None


def _mx_host(text: object) -> MxHost:
    """Return an MxHost parsed from text or raise _Invalid."""
    if isinstance(text, MxHost):
        return text
    if not isinstance(text, str):
        raise _Invalid(f'must be a string like "mx.example.com:2525", not {_kind(text)}')
    host, port_text = text.strip(), None
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _Invalid(f'{text!r} is malformed; write "[2001:db8::1]:2525"')
        host, port_text = inner, rest[1:] if rest else None
        if ":" not in host:
            raise _Invalid(f"{text!r}: brackets are only for IPv6 addresses")
    elif host.count(":") == 1:
        host, port_text = host.split(":")
    port = None
    if port_text is not None:
        if not port_text.isdigit():
            raise _Invalid(f"{text!r} has an invalid port {port_text!r}")
        port = _port(int(port_text))
    try:
        return MxHost(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    if ":" in host:
        raise _Invalid(f"{text!r} is not a valid IPv6 address")
    name = host[:-1] if host.endswith(".") else host
    if name.replace(".", "").isdigit():
        raise _Invalid(f"{text!r} is not a valid IPv4 address")
    problem = _hostname_problem(name)
    if problem is not None:
        raise _Invalid(problem)
    return MxHost(name.lower(), port)


def parse_mx_host(text: object, where: str = "mx_list") -> MxHost:
    """Parse "host", "host:port", "1.2.3.4:25", "[::1]:25" or a bare IPv6 address."""
    try:
        return _mx_host(text)
    except _Invalid as exc:
        raise ConfigError([ConfigIssue(where, repr(text), "", str(exc))]) from None
