"""Prometheus metrics read from the database at scrape time, through a registry built per app.

Nothing is counted in process memory: the database is the truth, so the numbers survive restarts,
agree across the listener, workers and CLI, and need no global registry. Counters come from the
append-only audit trail and the duration histograms from the append-only job_durations table (retention
deletes neither, so they only grow); gauges from the current tables.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from db.counts import audit_event_count, duration_histogram, state_counts
from db.models import AuditEventType
from db.models import JobDuration as JD
from db.session import Database
from node.config import Settings
from node.inference_server import TritonMonitor
from node.spool import free_disk_bytes

log = logging.getLogger(__name__)

INFERENCE_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
SEND_FAILURE_EVENTS = (str(AuditEventType.SEND_RETRY), str(AuditEventType.SEND_DEAD))


class DatabaseCollector(Collector):
    """Collects the edgenode_* metrics from one node's database on every scrape."""

    def __init__(self, settings: Settings, db: Database, triton: TritonMonitor | None = None) -> None:
        self._settings = settings
        self._db = db
        self._triton = triton

    def collect(self) -> Iterator[Metric]:
        disk = GaugeMetricFamily("edgenode_disk_free_bytes", "Free bytes on the file system of data_dir")
        disk.add_metric([], float(free_disk_bytes(self._settings.data_dir)))
        yield disk
        if self._triton is not None:
            yield from self._inference_server()
        up = GaugeMetricFamily("edgenode_database_up", "1 when the database answered this scrape")
        try:
            families = list(self._from_database())
        except Exception:  # a scrape must still answer when the database does not
            log.exception("metrics: database query failed")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _inference_server(self) -> Iterator[Metric]:
        """backend "triton": 1 when the server serves this node's model now, and the state by name."""
        state = self._triton.state() if self._triton is not None else None
        up = GaugeMetricFamily(
            "edgenode_inference_server_up", "1 when the Triton server answered this scrape serving the node's model"
        )
        up.add_metric([], 1.0 if state is not None and state.ok else 0.0)
        yield up
        states = GaugeMetricFamily(
            "edgenode_inference_server_state", "The Triton server's state (1 = current)", labels=["state"]
        )
        for name in ("ok", "unreachable", "not ready", "mismatch"):
            states.add_metric([name], 1.0 if state is not None and state.state == name else 0.0)
        yield states

    def _from_database(self) -> Iterator[Metric]:
        with self._db.session() as session:
            stored = audit_event_count(session, [AuditEventType.INSTANCE_STORED])
            failures = audit_event_count(session, SEND_FAILURE_EVENTS)
            states = state_counts(session)
            durations = {
                column.key: duration_histogram(session, column, INFERENCE_BUCKETS)
                for column in (JD.worker_seconds, JD.queue_wait_seconds)
            }

        received = CounterMetricFamily("edgenode_instances_received", "DICOM instances stored (C-STORE accepted)")
        received.add_metric([], float(stored))
        yield received
        send_failures = CounterMetricFamily(
            "edgenode_send_failures", "Failed result C-STORE attempts (retried or dead-lettered)"
        )
        send_failures.add_metric([], float(failures))
        yield send_failures
        for name, doc, counts in (
            ("edgenode_jobs", "Inference jobs by state", states.jobs),
            ("edgenode_studies", "Studies by state", states.studies),
            ("edgenode_outbound_items", "Result deliveries by state", states.outbound),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["state"])
            for state in sorted(counts):
                gauge.add_metric([state], float(counts[state]))
            yield gauge
        for name, doc, key in (
            (
                "edgenode_inference_seconds",
                "Worker time of finished jobs: inference plus encoding of the results (queue wait excluded)",
                JD.worker_seconds.key,
            ),
            (
                "edgenode_queue_wait_seconds",
                "Time finished jobs waited in the queue for a worker",
                JD.queue_wait_seconds.key,
            ),
        ):
            buckets, total = durations[key]
            hist = HistogramMetricFamily(name, doc)
            hist.add_metric([], buckets, sum_value=total)
            yield hist


def build_registry(settings: Settings, db: Database, triton: TritonMonitor | None = None) -> CollectorRegistry:
    """A fresh registry holding only this node's database collector (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, db, triton))
    return registry
