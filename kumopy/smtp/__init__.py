"""SMTP: wire encoding, replies, the client conversation and the test sink."""

__all__: list[str] = []
