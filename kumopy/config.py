"""Egress sources, pools and queue configs as frozen dataclasses (validation.py builds them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kumopy.rates import Rate, Warmup

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
    "queue_name",
]

UNSPECIFIED = "unspecified"
"""Name of the built-in source (no bind, host name as EHLO) and of the pool holding only it."""
SOURCE_OPTIONS = (
    "source_address",
    "ehlo_domain",
    "remote_port",
    "source_selection_rate",
    "warmup",
)
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
    source_selection_rate: Rate | None = None
    """How often the source may be picked at all, whatever the site (warm-up)."""
    warmup: Warmup | None = None
    """Daily pick caps by day since a start date; past the schedule, no cap."""

    @property
    def family(self) -> str | None:
        """Return "ipv4" or "ipv6" for the source address, or None when there is none."""
        if self.source_address is None:
            return None
        return "ipv6" if ":" in self.source_address else "ipv4"

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe dict that validation.source_from_dict() turns back."""
        return {
            "name": self.name,
            "source_address": self.source_address,
            "ehlo_domain": self.ehlo_domain,
            "remote_port": self.remote_port,
            "source_selection_rate": (
                self.source_selection_rate.text if self.source_selection_rate else None
            ),
            "warmup": (
                {"start": w.start, "daily": list(w.daily), "period": w.period}
                if (w := self.warmup) is not None
                else None
            ),
        }


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
    max_message_rate: Rate | None = None
    """Picks for this scheduled queue at most, whichever sources it uses."""


def queue_name(
    domain: str, tenant: str | None, campaign: str | None, routing_domain: str | None = None
) -> str:
    """Name a scheduled queue `campaign:tenant@domain!routing_domain`, leaving out absent parts."""
    name = f"{tenant}@{domain}" if tenant else domain
    if routing_domain:
        name = f"{name}!{routing_domain}"
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
