"""The demo policy: three sources on loopback addresses, in two overlapping pools.

Set KUMOPY_DEMO_SINK (for example "127.0.0.1:2526") to send every message to that host
instead of looking up MX records; `kumopy demo` sets it to its own sink.
"""

from __future__ import annotations

import os

from kumopy import kumo
from kumopy.config import QueueConfig

SINK = os.environ.get("KUMOPY_DEMO_SINK")
POOL_OF_TENANT = {"acme": "transactional", "bigco": "bulk"}


@kumo.on("init")
def init() -> None:
    """Define mta1..mta3 on 127.0.0.2..4 and the transactional and bulk pools."""
    for n in (1, 2, 3):
        kumo.define_egress_source(
            name=f"mta{n}",
            source_address=f"127.0.0.{n + 1}",
            ehlo_domain=f"mta{n}.demo.kumopy.test",
        )
    # mta2 is in both pools: it carries 2/3 of transactional and 1/4 of bulk mail.
    kumo.define_egress_pool(
        name="transactional",
        entries=[{"name": "mta1", "weight": 1}, {"name": "mta2", "weight": 2}],
    )
    kumo.define_egress_pool(
        name="bulk",
        entries=[{"name": "mta2", "weight": 1}, {"name": "mta3", "weight": 3}],
    )


@kumo.on("get_queue_config")
def get_queue_config(
    domain: str, tenant: str | None, campaign: str | None, routing_domain: str | None
) -> QueueConfig:
    """Route tenant bigco to the bulk pool and everyone else to transactional."""
    return kumo.make_queue_config(
        egress_pool=POOL_OF_TENANT.get(tenant or "", "transactional"),
        mx_list=[SINK] if SINK else None,
    )
