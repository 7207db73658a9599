"""Chapter example 3: a source that sends over IPv6."""

from kumopy import kumo


@kumo.on("init")
def init() -> None:
    """Define the source."""
    kumo.define_egress_source(
        name="ip-2",
        source_address="2001:db8:3333:4444:5555:6666:7777:8888",
        ehlo_domain="mta2.examplecorp.com",
    )
