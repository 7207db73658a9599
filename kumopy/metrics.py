"""Prometheus metrics for the coordinator, served from a snapshot the main loop refreshes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
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
        up = GaugeMetricFamily(
            "kumopy_source_up",
            "1 when the source can be picked (worker up, not suspended, not retired)",
            labels=labels,
        )
        transient = CounterMetricFamily(
            "kumopy_source_transient_failures", "Recipients deferred per source", labels=labels
        )
        bounced = CounterMetricFamily(
            "kumopy_source_bounces", "Recipients bounced per source", labels=labels
        )
        for name, s in sorted(st.get("sources", {}).items()):
            lv = [name, s.get("source_address") or ""]
            delivered.add_metric(lv, s.get("delivered", 0))
            dispatched.add_metric(lv, s.get("dispatched", 0))
            credit.add_metric(lv, s.get("credit", 0))
            up.add_metric(lv, 1 if s.get("up", s.get("live")) else 0)
            transient.add_metric(lv, s.get("transient", 0))
            bounced.add_metric(lv, s.get("bounced", 0))
        yield from (delivered, dispatched, credit, up, transient, bounced)
        yield from _by_path(st.get("paths", []))
        holds = GaugeMetricFamily(
            "kumopy_holds", "Suspensions and overrides in force", labels=["kind"]
        )
        counts: dict[str, int] = {}
        for hold in st.get("holds", []):
            counts[hold["kind"]] = counts.get(hold["kind"], 0) + 1
        for kind, n in sorted(counts.items()):
            holds.add_metric([kind], n)
        yield holds
        limits = st.get("limits", {})
        refused = CounterMetricFamily(
            "kumopy_limit_refused_picks", "Picks a rate or cap turned away", labels=["kind"]
        )
        for kind, n in sorted(limits.get("refused_picks", {}).items()):
            refused.add_metric([kind], n)
        yield refused
        if limits.get("mode") == "redis":
            yield GaugeMetricFamily(
                "kumopy_redis_connected",
                "1 while shared limits reach Redis (0: local limits only)",
                value=1 if limits.get("connected") else 0,
            )
        picks = CounterMetricFamily(
            "kumopy_pool_picks", "Sources picked per pool", labels=["pool", "source"]
        )
        for pool, counts in sorted(st.get("pools", {}).items()):
            for name, n in sorted(counts.items()):
                picks.add_metric([pool, name], n)
        yield picks


def _by_path(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Yield KumoMTA's per provider x source counters and the ready count per source x site."""
    names = (
        ("delivered", "total_messages_delivered_by_provider_and_source", "delivered"),
        ("deferred", "total_messages_transfail_by_provider_and_source", "deferred"),
        ("bounced", "total_messages_fail_by_provider_and_source", "bounced"),
    )
    for field, metric, what in names:
        # Untyped, as KumoMTA exposes them: a Counter family would rename them *_total.
        family = UnknownMetricFamily(
            metric, f"Recipients {what} per provider and source", labels=["provider", "source"]
        )
        totals: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.get("provider") or "", row["source"])
            totals[key] = totals.get(key, 0) + int(row[field])
        for (provider, source), n in sorted(totals.items()):
            family.add_metric([provider, source], n)
        yield family
    ready = GaugeMetricFamily(
        "ready_count", "Messages picked for a source, waiting for its worker", labels=["queue"]
    )
    for row in rows:
        ready.add_metric([f"{row['source']}->{row['site']}@smtp_client"], row["ready"])
    yield ready
