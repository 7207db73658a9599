"""The egress path config (per source and site): connections, TLS, hosts, timeouts; validated."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from kumopy.errors import ConfigError, ConfigIssue, kind_of
from kumopy.rates import Rate, parse_rate
from kumopy.smtp.tls import TLS_MODES
from kumopy.units import duration_seconds
from kumopy.validation import check_ehlo_domain, suggest

__all__ = [
    "DEFAULT_PROHIBITED",
    "IP_LOOKUP_STRATEGIES",
    "PATH_OPTIONS",
    "EgressPath",
    "Network",
    "PathOptions",
    "make_egress_path",
]

IP_LOOKUP_STRATEGIES = ("Ipv4AndIpv6", "Ipv4Only", "Ipv6Only", "Ipv4ThenIpv6", "Ipv6ThenIpv4")
"""KumoMTA's ip_lookup_strategy values (for a source with no address; a bound source keeps to
its own family)."""
DEFAULT_PROHIBITED = ("127.0.0.0/8", "::1", "0.0.0.0", "::")
"""KumoMTA's default prohibited_hosts: bad DNS must not make the sender mail itself."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TIMEOUTS = (
    "connect_timeout",
    "banner_timeout",
    "ehlo_timeout",
    "starttls_timeout",
    "mail_from_timeout",
    "rcpt_to_timeout",
    "data_timeout",
    "data_block_timeout",
    "data_dot_timeout",
    "idle_timeout",
)
_RATES = (
    "max_message_rate",
    "max_connection_rate",
    "source_selection_rate",
    "provider_max_message_rate",
)


@dataclass(frozen=True, slots=True)
class EgressPath:
    """How one source sends to one site; the defaults come from `kumopy run`'s flags."""

    connection_limit: int = 32
    """SMTP connections the source keeps to the site at most."""
    max_deliveries_per_connection: int = 1024
    """Messages over one connection before it is replaced."""
    max_recipients_per_batch: int = 100
    """Recipients per transaction; more are split into several."""
    enable_tls: str = "Opportunistic"
    """One of TLS_MODES."""
    enable_mta_sts: bool = True
    """Obey the destination's MTA-STS policy (RFC 8461)."""
    enable_pipelining: bool = True
    """Pipeline commands when the peer offers PIPELINING."""
    smtp_port: int = 25
    """Destination port (a source's remote_port and an mx_list port take precedence)."""
    ehlo_domain: str | None = None
    """EHLO name for this path, before the source's own."""
    tls_ca_file: str | None = None
    """CA bundle to verify peers' certificates with; None: the system's store."""
    remember_broken_tls: float | None = 3600.0
    """Seconds a host whose TLS handshake failed gets mail in clear (Opportunistic); None: never."""
    prohibited_hosts: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_PROHIBITED
    )
    """A destination address in these fails the site (bad DNS); mx_list is exempt."""
    skip_hosts: tuple[Network, ...] = ()
    """Destination addresses in these are passed over; mx_list is exempt."""
    ip_lookup_strategy: str = "Ipv4AndIpv6"
    """One of IP_LOOKUP_STRATEGIES."""
    connect_timeout: float = 60.0
    banner_timeout: float = 300.0
    """RFC 5321 4.5.3.2 minimum for the greeting."""
    ehlo_timeout: float = 300.0
    starttls_timeout: float = 60.0
    mail_from_timeout: float = 300.0
    rcpt_to_timeout: float = 300.0
    data_timeout: float = 120.0
    """RFC 5321: DATA initiation."""
    data_block_timeout: float = 180.0
    """RFC 5321: each block of the body written."""
    data_dot_timeout: float = 600.0
    """RFC 5321: DATA termination (the reply after the final dot)."""
    idle_timeout: float = 5.0
    """How long an unused connection stays open (KumoMTA's default)."""
    max_message_rate: Rate | None = None
    """Messages this source sends to this site at most; past it the pool's others take over."""
    max_burst: int | None = None
    """Burst of max_message_rate (its limit when unset)."""
    max_connection_rate: Rate | None = None
    """New connections the worker opens to this site at most."""
    source_selection_rate: Rate | None = None
    """How often this source is picked for this site (warm-up per site)."""
    provider_name: str | None = None
    """The provider this site belongs to (set by a shaping file); provider_* limits span every
    site of the provider."""
    provider_max_message_rate: Rate | None = None
    """Messages this source sends to all sites of the provider at most."""
    provider_connection_limit: int | None = None
    """Connections this source keeps to all sites of the provider at most."""
    origin: str = field(default="defaults", compare=False)
    """Where this config came from (`file:line` of make_egress_path), for messages."""

    @property
    def message_rate(self) -> Rate | None:
        """Return max_message_rate with max_burst applied."""
        rate = self.max_message_rate
        if rate is None or self.max_burst is None:
            return rate
        return replace(rate, burst=self.max_burst)

    def timeouts(self) -> dict[str, float]:
        """Return the SMTP timeouts by step name (connect, banner, ..., idle)."""
        return {name.removesuffix("_timeout"): getattr(self, name) for name in _TIMEOUTS}

    def to_wire(self) -> dict[str, Any]:
        """Return what the worker needs, msgpack-safe."""
        return {
            "connection_limit": self.connection_limit,
            "max_deliveries_per_connection": self.max_deliveries_per_connection,
            "max_recipients_per_batch": self.max_recipients_per_batch,
            "enable_tls": self.enable_tls,
            "enable_pipelining": self.enable_pipelining,
            "ehlo_domain": self.ehlo_domain,
            "tls_ca_file": self.tls_ca_file,
            "remember_broken_tls": self.remember_broken_tls,
            "ip_lookup_strategy": self.ip_lookup_strategy,
            "timeouts": self.timeouts(),
            "max_connection_rate": (
                self.max_connection_rate.text if self.max_connection_rate else None
            ),
            "provider_name": self.provider_name,
            "provider_connection_limit": self.provider_connection_limit,
        }


PATH_OPTIONS = tuple(f.name for f in fields(EgressPath) if f.name != "origin")
"""Every option make_egress_path takes."""


class _Invalid(Exception):
    """A value failed validation; the argument is the problem, worded for an operator."""


def _positive_int(value: object) -> int:
    if isinstance(value, str) and value.replace(",", "").isdigit():
        value = int(value.replace(",", ""))  # KumoMTA accepts "1,000"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"must be a whole number >= 1, not {kind_of(value)} ({value!r})")
    return value


def _choice(value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _Invalid(f"must be one of {', '.join(choices)}, not {value!r}")
    assert isinstance(value, str)
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {kind_of(value)}")
    return value


def _seconds(value: object) -> float:
    try:
        seconds = duration_seconds(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    if seconds <= 0:
        raise _Invalid("must be longer than zero")
    return seconds


def _networks(value: object) -> tuple[Network, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        example = '["10.0.0.0/8"]'
        raise _Invalid(f"must be a list of addresses or CIDR blocks like {example}, not {value!r}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise _Invalid(f"item {i}: {item!r} is not an IP address or CIDR block") from None
    return tuple(out)


def _option(key: str, value: object) -> object:
    """Validate one option; raise _Invalid naming the problem."""
    if key in _TIMEOUTS:
        return _seconds(value)
    if key in (
        "connection_limit",
        "max_deliveries_per_connection",
        "max_recipients_per_batch",
        "max_burst",
        "provider_connection_limit",
    ):
        if value is None and key in ("max_burst", "provider_connection_limit"):
            return None
        return _positive_int(value)
    if key in _RATES:
        if value is None:
            return None
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    if key == "smtp_port":
        port = _positive_int(value)
        if port > 65535:
            raise _Invalid(f"{port} is not a port number (1 to 65535)")
        return port
    if key == "enable_tls":
        return _choice(value, TLS_MODES)
    if key == "ip_lookup_strategy":
        return _choice(value, IP_LOOKUP_STRATEGIES)
    if key in ("enable_mta_sts", "enable_pipelining"):
        return _flag(value)
    if key in ("prohibited_hosts", "skip_hosts"):
        return _networks(value)
    if key == "remember_broken_tls":
        return None if value is None else _seconds(value)
    if key in ("ehlo_domain", "tls_ca_file", "provider_name"):
        if value is not None and (not isinstance(value, str) or not value):
            raise _Invalid(f"must be a non-empty string, not {kind_of(value)}")
        if key == "ehlo_domain" and value is not None:
            try:
                return check_ehlo_domain(value)
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        return value
    raise AssertionError(key)


@dataclass(frozen=True, slots=True)
class PathOptions:
    """Validated options from kumo.make_egress_path, applied over the run's defaults."""

    values: Mapping[str, Any]
    origin: str
    """`file:line` of the make_egress_path call."""

    def over(self, base: EgressPath) -> EgressPath:
        """Return base with these options set."""
        return replace(base, origin=self.origin, **self.values)


def make_egress_path(options: Mapping[str, object], where: str) -> PathOptions:
    """Validate egress path options; raise ConfigError listing every problem."""
    issues: list[ConfigIssue] = []
    values: dict[str, Any] = {}
    obj = "egress path"
    for key, value in options.items():
        if key not in PATH_OPTIONS:
            problem = f"unknown option{suggest(str(key), PATH_OPTIONS)}"
            issues.append(ConfigIssue(where, obj, str(key), problem))
        else:
            try:
                values[key] = _option(key, value)
            except _Invalid as exc:
                issues.append(ConfigIssue(where, obj, key, str(exc)))
    if issues:
        raise ConfigError(issues)
    return PathOptions(MappingProxyType(values), where)
