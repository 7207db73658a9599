"""Validate what the operator wrote (sources, pools, mx hosts) into a Config, or say why not."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from kumopy.config import (
    MAX_WEIGHT,
    RESERVED_SOURCE_OPTIONS,
    SOURCE_OPTIONS,
    UNSPECIFIED,
    Config,
    EgressPool,
    EgressSource,
    MxHost,
    PoolDefinition,
    PoolEntry,
    QueueConfig,
    SourceDefinition,
)
from kumopy.errors import ConfigError, ConfigIssue, kind_of
from kumopy.hostnames import hostname_problem, parse_address_literal
from kumopy.rates import parse_rate, parse_warmup
from kumopy.units import parse_duration

__all__ = [
    "build_config",
    "check_ehlo_domain",
    "describe",
    "make_queue_config",
    "parse_mx_host",
    "source_from_dict",
    "suggest",
]

_NAME_MAX_BYTES = 255  # the source name is the worker's ZeroMQ identity, limited to 255 bytes


class _Invalid(Exception):
    """A value failed validation; the argument is the problem, worded for an operator."""


def describe(kind: str, name: object) -> str:
    """Return how an object is named in messages, e.g. `source "ip-1"`."""
    if isinstance(name, str) and name:
        return f'{kind} "{name}"'
    return f"{kind} (no valid name)"


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return a "did you mean" hint for a misspelt word, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _name_problem(value: object) -> str | None:
    """Return why a source or pool name is unusable, or None."""
    if value is None:
        return "a name is required"
    if not isinstance(value, str):
        return f"name must be a string, not {kind_of(value)}"
    if not value:
        return "name must not be empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return f"name {value!r} must not contain spaces or control characters"
    if len(value.encode()) > _NAME_MAX_BYTES:
        return f"name is longer than {_NAME_MAX_BYTES} bytes"
    return None


def _source_address(value: object) -> str:
    """Return the normalised source address or raise _Invalid."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = value
    elif not isinstance(value, str):
        raise _Invalid(f"must be an IP address string, not {kind_of(value)}")
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
    if hostname_problem(text.rstrip(".")) is None and not text.replace(".", "").isdigit():
        return (
            "source_address must be an IP literal, not a host name; resolve it yourself and "
            f"give the address (kumopy never resolves names to bind): {text!r}"
        )
    return f"{text!r} is not a valid IPv4 or IPv6 address"


def _ehlo_domain(value: object) -> str:
    """Return the EHLO name or raise _Invalid."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a host name string, not {kind_of(value)}")
    if value.startswith("[") and value.endswith("]"):
        try:
            parse_address_literal(value)
        except ValueError as exc:
            raise _Invalid(f"{value!r} is not a valid address literal: {exc}") from None
        return value
    if value.endswith("."):
        raise _Invalid(f"{value!r} ends with a dot; remove it")
    problem = hostname_problem(value)
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
        raise _Invalid(f"must be a whole number from 1 to 65535, not {kind_of(value)}")
    if not 1 <= value <= 65535:
        raise _Invalid(f"{value} is not a port number (1 to 65535)")
    return value


def _make_source(definition: SourceDefinition) -> tuple[EgressSource | None, list[ConfigIssue]]:
    """Validate the options of a named source definition; return the source or the issues."""
    assert isinstance(definition.name, str)
    obj = describe("source", definition.name)
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
            hint = suggest(str(key), (*known, *RESERVED_SOURCE_OPTIONS))
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
            elif key == "source_selection_rate":
                values[key] = parse_rate(value)
            elif key == "warmup":
                values[key] = parse_warmup(value)
            else:
                values[key] = _port(value)
        except (_Invalid, ValueError) as exc:
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
        raise _Invalid(f"must be a whole number >= 0, not {kind_of(value)} ({value!r})")
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
        hint = suggest(str(key), ("name", "entries"))
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
            shape = f'must be a table like {{"name": "ip-1", "weight": 1}}, not {kind_of(value)}'
            issues.append(ConfigIssue(entry.where, obj, entry.label, shape))
            continue
        for key in value:
            if key not in ("name", "weight"):
                hint = suggest(str(key), ("name", "weight"))
                unknown = f"unknown option{hint}; an entry takes name and weight"
                issues.append(ConfigIssue(entry.where, obj, f"{entry.label}.{key}", unknown))
        name = value.get("name")
        problem = _name_problem(name)
        if problem is None and name not in known:
            problem = f"unknown source {name!r}{suggest(str(name), known)}; define it first"
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
    obj = describe(kind, name)
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
        pool = _make_pool(pool_def, describe("pool", name), known, found)
        if pool is not None:
            pool_map[name] = pool
    if found:
        raise ConfigError(found)
    return Config(MappingProxyType(source_map), MappingProxyType(pool_map))


def _mx_host(text: object) -> MxHost:
    """Return an MxHost parsed from text or raise _Invalid."""
    if isinstance(text, MxHost):
        return text
    if not isinstance(text, str):
        raise _Invalid(f'must be a string like "mx.example.com:2525", not {kind_of(text)}')
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
    problem = hostname_problem(name)
    if problem is not None:
        raise _Invalid(problem)
    return MxHost(name.lower(), port)


def parse_mx_host(text: object, where: str = "mx_list") -> MxHost:
    """Parse "host", "host:port", "1.2.3.4:25", "[::1]:25" or a bare IPv6 address."""
    try:
        return _mx_host(text)
    except _Invalid as exc:
        raise ConfigError([ConfigIssue(where, repr(text), "", str(exc))]) from None


def source_from_dict(data: Mapping[str, Any]) -> EgressSource:
    """Rebuild a source from EgressSource.to_dict(), validating it again; raise ConfigError."""
    options = {k: v for k, v in data.items() if k != "name"}
    name = data.get("name")
    problem = _name_problem(name)
    if problem is not None:
        raise ConfigError([ConfigIssue("message", describe("source", name), "name", problem)])
    assert isinstance(name, str)
    source, issues = _make_source(SourceDefinition(name, options, "message"))
    if source is None:
        raise ConfigError(issues)
    return source


def check_ehlo_domain(value: object) -> str:
    """Return a valid EHLO name (a FQDN or an address literal); raise ValueError saying why not."""
    try:
        return _ehlo_domain(value)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


_QUEUE_OPTIONS = (
    "egress_pool",
    "retry_interval",
    "max_retry_interval",
    "max_age",
    "mx_list",
    "max_message_rate",
)
_RESERVED_QUEUE_OPTIONS = ("protocol",)


def _queue_option(key: str, value: object) -> object:
    """Validate one make_queue_config option; raise ValueError naming the problem."""
    if key == "egress_pool":
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be the name of a pool, not {value!r}")
        return value
    if key == "mx_list":
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            example = '["mx.example.com:2525"]'
            raise ValueError(f"must be a list of hosts like {example}, not {value!r}")
        if not value:
            raise ValueError("is empty; leave mx_list out to look up MX records")
        hosts = []
        for i, item in enumerate(value):
            try:
                hosts.append(parse_mx_host(item))
            except ConfigError as exc:
                raise ValueError(f"item {i}: {exc.issues[0].problem}") from None
        return tuple(hosts)
    if key in ("max_retry_interval", "max_message_rate") and value is None:
        return None
    if key == "max_message_rate":
        return parse_rate(value)
    try:
        seconds = parse_duration(value)
    except ConfigError as exc:
        raise ValueError(exc.issues[0].problem) from None
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def make_queue_config(options: Mapping[str, object], where: str) -> QueueConfig:
    """Validate make_queue_config options; return a QueueConfig or raise ConfigError."""
    issues: list[ConfigIssue] = []
    values: dict[str, Any] = {}
    obj = "queue config"
    for key, value in options.items():
        if key in _RESERVED_QUEUE_OPTIONS:
            issues.append(ConfigIssue(where, obj, key, "not supported yet by kumopy; remove it"))
        elif key not in _QUEUE_OPTIONS:
            hint = suggest(key, _QUEUE_OPTIONS)
            problem = f"unknown option{hint}; known options: {', '.join(_QUEUE_OPTIONS)}"
            issues.append(ConfigIssue(where, obj, key, problem))
        else:
            try:
                values[key] = _queue_option(key, value)
            except ValueError as exc:
                issues.append(ConfigIssue(where, obj, key, str(exc)))
    cap, retry = values.get("max_retry_interval"), values.get("retry_interval", 1200.0)
    if cap is not None and cap < retry:
        problem = f"{cap:g}s is shorter than retry_interval ({retry:g}s)"
        issues.append(ConfigIssue(where, obj, "max_retry_interval", problem))
    if issues:
        raise ConfigError(issues)
    return QueueConfig(**values)
