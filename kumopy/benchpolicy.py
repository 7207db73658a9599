"""The policies `kumopy bench` runs: N synthetic sources, or one source of a policy alone."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kumopy.config import Config
from kumopy.errors import KumoError
from kumopy.paths import PATH_OPTIONS, EgressPath, PathOptions
from kumopy.policy import Policy, load_policy

__all__ = [
    "BENCH_DOMAIN",
    "ONLY_POOL",
    "SYNTHETIC_POOL",
    "PolicyPlan",
    "expected_shares",
    "only_source_policy",
    "path_options",
    "plan_policy",
    "source_address",
    "synthetic_policy",
]

BENCH_DOMAIN = "bench.kumopy.test"
"""Recipient domain of the generated messages (the sink takes any)."""
SYNTHETIC_POOL = "bench"
ONLY_POOL = "kumopy-bench-only"
"""The one-source pool of an `--each` run."""
_FIRST = int(ipaddress.IPv4Address("127.0.0.2"))


def source_address(index: int) -> str:
    """Return the loopback address of synthetic source `index` (0: 127.0.0.2).

    Addresses run 127.0.0.2..127.0.0.254, then 127.0.1.1..127.0.1.254, and so on, leaving
    out the .0 and .255 of each /24, which look like network and broadcast addresses.
    """
    if index < 0:
        raise ValueError(f"source index {index} < 0")
    # 253 addresses in 127.0.0.0/24 (from .2), then 254 in each following /24 (from .1).
    if index < 253:
        return str(ipaddress.IPv4Address(_FIRST + index))
    block, offset = divmod(index - 253, 254)
    address = ipaddress.IPv4Address(int(ipaddress.IPv4Address("127.0.1.1")) + block * 256 + offset)
    if address not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ValueError(f"source index {index}: past the end of 127.0.0.0/8")
    return str(address)


def synthetic_policy(weights: Sequence[int]) -> str:
    """Return a policy of len(weights) sources on 127.0.0.2 upwards, in one weighted pool."""
    entries = [
        {"name": f"bench{i + 1}", "weight": w, "address": source_address(i)}
        for i, w in enumerate(weights)
    ]
    return f'''"""kumopy bench: {len(entries)} synthetic sources on loopback in one pool."""
from kumopy import kumo

SOURCES = {entries!r}


@kumo.on("init")
def init():
    for s in SOURCES:
        kumo.define_egress_source(
            name=s["name"],
            source_address=s["address"],
            ehlo_domain=s["name"] + ".{BENCH_DOMAIN}",
        )
    kumo.define_egress_pool(
        name={SYNTHETIC_POOL!r},
        entries=[{{"name": s["name"], "weight": s["weight"]}} for s in SOURCES],
    )


@kumo.on("get_queue_config")
def get_queue_config(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool={SYNTHETIC_POOL!r})
'''


def only_source_policy(policy: str, source: str) -> str:
    """Return a policy that sends every queue from one source of `policy`, alone.

    It keeps the source's address, EHLO name and the policy's egress path settings for it,
    so that the source's capacity alone is measured as the policy would send.
    """
    return f'''"""kumopy bench --each: source {source!r} of {policy} alone."""
from kumopy import kumo
from kumopy.benchpolicy import ONLY_POOL, path_options
from kumopy.policy import load_policy

POLICY = load_policy({policy!r})
SOURCE = POLICY.config.sources[{source!r}]


@kumo.on("init")
def init():
    kumo.define_egress_source(
        name=SOURCE.name, source_address=SOURCE.source_address, ehlo_domain=SOURCE.ehlo_domain
    )
    kumo.define_egress_pool(name=ONLY_POOL, entries=[{{"name": SOURCE.name}}])


@kumo.on("get_queue_config")
def get_queue_config(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool=ONLY_POOL)


@kumo.on("get_egress_path_config")
def get_egress_path_config(routing_domain, egress_source, site_name):
    return path_options(POLICY, routing_domain, egress_source, site_name)
'''


def path_options(policy: Policy, routing_domain: str, source: str, site: str) -> PathOptions:
    """Return the policy's egress path settings for (source, site) that differ from defaults."""
    base = EgressPath()
    path = policy.path_config(routing_domain, source, site, base)
    values = {n: getattr(path, n) for n in PATH_OPTIONS if getattr(path, n) != getattr(base, n)}
    return PathOptions(values, path.origin)


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    """What a bench run sends from: the policy file, its sources, and their pools' weights."""

    path: Path
    sources: list[str]
    """The sources some pool sends from, in definition order (without `unspecified`)."""
    addresses: dict[str, str | None]
    config: Config


def plan_policy(path: Path) -> PolicyPlan:
    """Load a policy as `kumopy run` will; refuse what the sink cannot receive."""
    policy = load_policy(path)
    used = [s for s in policy.config.used_sources() if s.name != "unspecified"]
    for s in used:
        if s.remote_port is not None:
            # A source's remote_port wins over an mx_list port: its mail would miss the sink.
            raise KumoError(
                f"source {s.name} has remote_port {s.remote_port}, which would send past the "
                "benchmark's sink; benchmark a copy of the policy without it"
            )
    return PolicyPlan(
        path, [s.name for s in used], {s.name: s.source_address for s in used}, policy.config
    )


def expected_shares(config: Config, picks: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Return each source's expected share of all mail, from its pools' weights and picks.

    Each pool counts by how many messages it sent (the coordinator's picks per pool).
    """
    total = sum(sum(p.values()) for p in picks.values())
    shares: dict[str, float] = {}
    for pool_name, pool_picks in picks.items():
        pool = config.pools.get(pool_name)
        if pool is None or not total:
            continue
        weight = sum(e.weight for e in pool.entries)
        sent = sum(pool_picks.values())
        for e in pool.entries:
            shares[e.name] = shares.get(e.name, 0.0) + sent / total * e.weight / weight
    return shares
