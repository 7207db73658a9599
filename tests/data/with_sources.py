"""A policy that defines one source itself and loads the rest from sources files."""

from kumopy import kumo


@kumo.on("init")
def init() -> None:
    """Define the relay source, then merge base.toml and override.toml in that order."""
    kumo.define_egress_source(name="relay", ehlo_domain="relay.example.net", remote_port=2525)
    kumo.load_sources("base.toml", "override.toml")
    kumo.define_egress_pool(name="relays", entries=[{"name": "relay"}, {"name": "mta-a"}])
