"""Chapter example 4: two sources in two pools, one weighted."""

from kumopy import kumo
from kumopy.config import QueueConfig


@kumo.on("init")
def init() -> None:
    """Define the sources and pools."""
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
    kumo.define_egress_pool(
        name="CustomerA",
        entries=[{"name": "ip-1"}],
    )
    kumo.define_egress_pool(
        name="SharedPool",
        entries=[{"name": "ip-1", "weight": 1}, {"name": "ip-2", "weight": 2}],
    )


@kumo.on("get_queue_config")
def get_queue_config(
    domain: str, tenant: str | None, campaign: str | None, routing_domain: str | None
) -> QueueConfig:
    """Assign tenant CustomerA to its pool and the rest to SharedPool."""
    pool = "CustomerA" if tenant == "CustomerA" else "SharedPool"
    return kumo.make_queue_config(egress_pool=pool)
