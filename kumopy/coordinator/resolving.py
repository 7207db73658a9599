"""The coordinator's resolver thread: MX lookups and MTA-STS policies, set up from the policy."""

from __future__ import annotations

import logging

from kumopy.dns import MXResolver, ResolverConfig
from kumopy.dns_thread import ResolverThread
from kumopy.errors import ResolverConfigError
from kumopy.mtasts import StsFetcher
from kumopy.policy_calls import Policy

__all__ = ["start_resolver"]

log = logging.getLogger(__name__)


def start_resolver(policy: Policy) -> ResolverThread | None:
    """Start the resolver thread the policy configured (None, logged, when it cannot be)."""
    config = policy.settings.get("resolver")
    if not isinstance(config, ResolverConfig):
        config = ResolverConfig()
    try:
        resolver = MXResolver(config)
    except ResolverConfigError as exc:
        # Not fatal: queues with an mx_list need no DNS; each queue that does will say why.
        log.error("DNS: %s; queues without mx_list cannot be sent", exc.message)
        return None
    sts_options = policy.settings.get("mta_sts") or {}
    sts = StsFetcher(resolver.addresses, resolver.txt, **sts_options)
    thread = ResolverThread(resolver, sts)
    thread.check_soon()  # logs clearly, without holding up the start, when no server answers
    return thread
