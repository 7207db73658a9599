"""Chapter example 1: a source with only a name."""

from kumopy import kumo


@kumo.on("init")
def init() -> None:
    """Define the source."""
    kumo.define_egress_source(name="example")
