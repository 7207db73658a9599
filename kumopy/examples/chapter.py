"""The examples of KumoMTA's "Configuring Sending IPs" chapter, written as a kumopy policy.

Check it with: kumopy check-config kumopy/examples/chapter.py
"""

from __future__ import annotations

from kumopy import kumo
from kumopy.config import QueueConfig


@kumo.on("init")
def init() -> None:
    """Define the chapter's sources and pools."""
    # A source with only a name: its own queues, but the host's default address.
    kumo.define_egress_source(name="example")

    # Sources bound to one IPv4 and one IPv6 address, each with its own EHLO name
    # (which should match the PTR record of the address).
    kumo.define_egress_source(
        name="ip-1",
        source_address="10.0.0.1",
        ehlo_domain="mta1.examplecorp.com",
    )
    kumo.define_egress_source(
        name="ip-2",
        source_address="2001:db8:3333:4444:5555:6666:7777:8888",
        ehlo_domain="mta2.examplecorp.com",
    )

    # A pool for one customer, and a shared pool sending twice as much from ip-2.
    kumo.define_egress_pool(name="CustomerA", entries=[{"name": "ip-1"}])
    kumo.define_egress_pool(
        name="SharedPool",
        entries=[{"name": "ip-1", "weight": 1}, {"name": "ip-2", "weight": 2}],
    )


@kumo.on("get_queue_config")
def get_queue_config(
    domain: str, tenant: str | None, campaign: str | None, routing_domain: str | None
) -> QueueConfig:
    """Send tenant CustomerA's mail from its own pool and everyone else's from the shared one."""
    pool = "CustomerA" if tenant == "CustomerA" else "SharedPool"
    return kumo.make_queue_config(egress_pool=pool)
