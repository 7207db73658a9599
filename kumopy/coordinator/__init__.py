"""The coordinator process: ingress, spool, queues, dispatch and supervision."""

__all__: list[str] = []
