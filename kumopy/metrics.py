"""Prometheus metrics for the coordinator, served from a snapshot the main loop refreshes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["MetricsExporter", "parse_metrics_address"]

log = logging.getLogger(__name__)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """Parse "HOST:PORT" or "[V6]:PORT" for --metrics."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics {text!r}: use HOST:PORT, e.g. 127.0.0.1:9125")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsExporter(Collector):
    """Serve /metrics over HTTP; the coordinator's loop hands it a fresh status dict."""

    def __init__(self, host: str, port: int) -> None:
        # The HTTP thread only reads the snapshot reference, which the main loop replaces
        # whole: no lock and no access to live coordinator state from another thread.
        self.snapshot: dict[str, Any] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self.server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def update(self, status: dict[str, Any]) -> None:
        """Publish a new status snapshot."""
        self.snapshot = status

    def close(self) -> None:
        """Stop the HTTP server."""
        self.server.shutdown()
        self.server.server_close()

    def collect(self) -> Iterator[Metric]:
        """Turn the latest snapshot into metric families."""
        st = self.snapshot
        if not st:
            return
        for key, help_text in (
            ("messages", "Messages in the spool"),
            ("ready", "Messages due now, waiting for a source"),
            ("delayed", "Messages waiting for a retry"),
            ("dispatched", "Messages sent to workers, waiting for their results"),
        ):
            yield GaugeMetricFamily(f"kumopy_{key}", help_text, value=st.get(key, 0))
        log_state = st.get("log", {})
        yield GaugeMetricFamily(
            "kumopy_log_write_failing",
            "1 while log records cannot be written",
            value=1 if log_state.get("failing") else 0,
        )
        yield GaugeMetricFamily(
            "kumopy_log_unwritten_records",
            "Log records waiting in memory for the log file",
            value=log_state.get("unwritten_records", 0),
        )
        rec = CounterMetricFamily("kumopy_records", "Log records written", labels=["type"])
        for kind, n in sorted(st.get("records", {}).items()):
            rec.add_metric([kind], n)
        yield rec
        inj = CounterMetricFamily("kumopy_injected", "Injected messages", labels=["result"])
        spool = st.get("spool", {})
        inj.add_metric(["accepted"], spool.get("accepted", 0))
        inj.add_metric(["rejected"], spool.get("rejected", 0))
        yield inj
        labels = ["source", "address"]
        delivered = CounterMetricFamily(
            "kumopy_source_delivered", "Recipients delivered per egress source", labels=labels
        )
        dispatched = GaugeMetricFamily(
            "kumopy_source_dispatched", "Messages at the worker", labels=labels
        )
        credit = GaugeMetricFamily("kumopy_source_credit", "Credit announced", labels=labels)
        up = GaugeMetricFamily("kumopy_source_up", "1 when the source can send", labels=labels)
        for name, s in sorted(st.get("sources", {}).items()):
            lv = [name, s.get("source_address") or ""]
            delivered.add_metric(lv, s.get("delivered", 0))
            dispatched.add_metric(lv, s.get("dispatched", 0))
            credit.add_metric(lv, s.get("credit", 0))
            up.add_metric(lv, 1 if s.get("live") else 0)
        yield from (delivered, dispatched, credit, up)
        picks = CounterMetricFamily(
            "kumopy_pool_picks", "Sources picked per pool", labels=["pool", "source"]
        )
        for pool, counts in sorted(st.get("pools", {}).items()):
            for name, n in sorted(counts.items()):
                picks.add_metric([pool, name], n)
        yield picks
