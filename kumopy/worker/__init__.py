"""The worker process: one egress source and its SMTP connections."""

__all__: list[str] = []
