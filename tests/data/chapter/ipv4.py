"""Chapter example 2: a source that sends from 10.0.0.1."""

from kumopy import kumo


@kumo.on("init")
def init() -> None:
    """Define the source."""
    kumo.define_egress_source(
        name="ip-1",
        source_address="10.0.0.1",
        ehlo_domain="mta1.examplecorp.com",
    )
