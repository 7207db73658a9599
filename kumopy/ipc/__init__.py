"""ZeroMQ framing and the message kinds exchanged between processes."""

__all__: list[str] = []
