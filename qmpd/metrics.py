"""Prometheus metrics of one daemon, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qmpd import __version__
from qmpd.runstate import RunState

if TYPE_CHECKING:
    from qmpd.qmp.budget import QMPInputBudget

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
)


class Metrics:
    """Every series qmpd exports; one instance per daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        Info("qmpd", "qmpd build information", registry=reg).info({"version": __version__})
        self.commands = Counter(
            "qmpd_qmp_commands",
            "QMP commands handled, by command and result (success or QMP error class)",
            ["command", "result"],
            registry=reg,
        )
        self.command_seconds = Histogram(
            "qmpd_qmp_command_duration_seconds",
            "Time from dispatch to reply of QMP commands",
            ["command"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.clients = Gauge(
            "qmpd_qmp_clients", "Connected QMP clients, by monitor", ["monitor"], registry=reg
        )
        self.connections = Counter(
            "qmpd_qmp_connections", "QMP connections accepted, by monitor", ["monitor"],
            registry=reg,
        )
        self.disconnects_for_backlog = Counter(
            "qmpd_qmp_output_limit_disconnects",
            "Clients dropped because they did not read their output",
            registry=reg,
        )
        self.events = Counter("qmpd_qmp_events", "QMP events emitted, by event", ["event"],
                              registry=reg)
        self.run_state = Enum(
            "qmpd_run_state", "Current run state", states=[s.value for s in RunState],
            registry=reg,
        )
        self.ready = Gauge("qmpd_ready", "1 when /ready answers 200", registry=reg)
        self.activations = Histogram(
            "qmpd_block_activation_seconds",
            "Time to activate (invalidate the cache of) one block node",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0),
            registry=reg,
        )
        self.migration_state = Enum(
            "qmpd_migration_status", "Status of the current or last migration",
            states=["none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
                    "postcopy-paused", "postcopy-recover", "completed", "failed", "colo",
                    "pre-switchover", "device", "wait-unplug"],
            registry=reg,
        )
        self.migration_total = Gauge(
            "qmpd_migration_total_seconds", "Total time of the last completed migration",
            registry=reg,
        )
        self.migration_downtime = Gauge(
            "qmpd_migration_downtime_seconds",
            "Downtime (stop to end of stream) of the last completed outgoing migration",
            registry=reg,
        )
        self.migration_bytes = Counter(
            "qmpd_migration_bytes", "Migration stream bytes, by direction", ["direction"],
            registry=reg,
        )
        self.activate_all_seconds = Histogram(
            "qmpd_migration_activation_seconds",
            "Time to activate every block node at the end of an incoming migration",
            registry=reg,
        )
        self._done_cache: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def command_done(self, command: str, result: str, seconds: float) -> None:
        pair = self._done_cache.get((command, result))
        if pair is None:
            pair = (
                self.commands.labels(command, result),
                self.command_seconds.labels(command),
            )
            self._done_cache[(command, result)] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def watch_nodes(self, nodes: Callable[[], Iterable[Any]]) -> None:
        """Export per-node series, read from the live graph at each scrape."""
        self.registry.register(_NodeCollector(nodes))

    def watch_jobs(self, jobs: Callable[[], Iterable[Any]]) -> None:
        """Export the jobs (query-jobs), read at each scrape."""
        self.registry.register(_JobCollector(jobs))

    def watch_qmp_input(self, budget: QMPInputBudget) -> None:
        """Export the shared QMP input budget, read at each scrape."""
        self.registry.register(_InputCollector(budget))

    def migration_status(self, status: str) -> None:
        self.migration_state.state(status)

    def migration_done(self, total: float, downtime: float) -> None:
        self.migration_total.set(total)
        self.migration_downtime.set(downtime)

    def observe_activate_all(self, seconds: float) -> None:
        self.activate_all_seconds.observe(seconds)

    def observe_activation(self, seconds: float) -> None:
        self.activations.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_NODE_COUNTERS = (
    ("rd_bytes", "qmpd_block_read_bytes", "Bytes read from a block node"),
    ("wr_bytes", "qmpd_block_written_bytes", "Bytes written to a block node"),
    ("rd_operations", "qmpd_block_read_operations", "Read requests on a block node"),
    ("wr_operations", "qmpd_block_write_operations", "Write requests on a block node"),
    ("flush_operations", "qmpd_block_flush_operations", "Flushes of a block node"),
    ("invalidations", "qmpd_block_invalidations", "Activations (cache invalidations) of a node"),
)


class _NodeCollector(Collector):
    """Per-node I/O counters and driver cache statistics."""

    def __init__(self, nodes: Callable[[], Iterable[Any]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterable[Any]:
        nodes = list(self.nodes())
        for attr, name, doc in _NODE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["node", "driver"])
            for node in nodes:
                family.add_metric(
                    [node.node_name, node.driver.format_name], getattr(node.stats, attr)
                )
            yield family
        active = GaugeMetricFamily(
            "qmpd_block_node_active", "1 when a node is active, 0 when inactive",
            labels=["node"],
        )
        failed = GaugeMetricFamily(
            "qmpd_block_node_activation_failed", "1 when the last activation of a node failed",
            labels=["node"],
        )
        caches = CounterMetricFamily(
            "qmpd_block_cache_lookups", "Metadata cache lookups (qcow2 L2 and refcount caches)",
            labels=["node", "cache", "result"],
        )
        bitmaps = GaugeMetricFamily(
            "qmpd_block_dirty_bitmaps", "Named dirty bitmaps of a node", labels=["node"],
        )
        dirty = GaugeMetricFamily(
            "qmpd_block_dirty_bitmap_bytes", "Bytes a dirty bitmap marks dirty (its count)",
            labels=["node", "bitmap"],
        )
        #: The drivers' own figures (BlockDriver.driver_metrics), by name.
        drivers: dict[str, GaugeMetricFamily] = {}
        for node in nodes:
            bitmaps.add_metric([node.node_name], len(node.dirty_bitmaps))
            for bitmap in node.dirty_bitmaps.values():
                dirty.add_metric([node.node_name, bitmap.name], bitmap.count())
            active.add_metric([node.node_name], 1 if node.active else 0)
            failed.add_metric([node.node_name], 1 if node.activation_error else 0)
            for cache, (hits, misses) in node.driver.cache_stats().items():
                caches.add_metric([node.node_name, cache, "hit"], hits)
                caches.add_metric([node.node_name, cache, "miss"], misses)
            for name, value in node.driver.driver_metrics().items():
                gauge = drivers.get(name)
                if gauge is None:
                    gauge = drivers[name] = GaugeMetricFamily(
                        f"qmpd_block_driver_{name}",
                        f"A block driver's own figure: {name.replace('_', ' ')}",
                        labels=["node", "driver"])
                gauge.add_metric([node.node_name, node.driver.format_name], value)
        yield active
        yield failed
        yield caches
        yield bitmaps
        yield dirty
        yield from drivers.values()


class _JobCollector(Collector):
    """How many jobs there are of each type in each status, and each job's progress."""

    def __init__(self, jobs: Callable[[], Iterable[Any]]) -> None:
        self.jobs = jobs

    def collect(self) -> Iterable[Any]:
        counts = GaugeMetricFamily(
            "qmpd_jobs", "Jobs (query-jobs) by type and status", labels=["type", "status"])
        current = GaugeMetricFamily(
            "qmpd_job_progress_current", "A job's current-progress", labels=["id", "type"])
        total = GaugeMetricFamily(
            "qmpd_job_progress_total", "A job's total-progress", labels=["id", "type"])
        by_kind: dict[tuple[str, str], int] = {}
        for job in self.jobs():
            kind = (job.job_type, job.status.value)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            current.add_metric([job.id, job.job_type], job.progress_current)
            total.add_metric([job.id, job.job_type], job.progress_total)
        for (job_type, status), count in sorted(by_kind.items()):
            counts.add_metric([job_type, status], count)
        yield counts
        yield current
        yield total


class _InputCollector(Collector):
    """Unfinished QMP input held across all clients, and growth refused."""

    def __init__(self, budget: QMPInputBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterable[Any]:
        budget = self.budget
        yield GaugeMetricFamily(
            "qmpd_qmp_input_bytes", "Unfinished QMP input held across all clients",
            value=budget.used,
        )
        yield GaugeMetricFamily(
            "qmpd_qmp_input_limit_bytes",
            "Unfinished QMP input allowed across all clients (--max-qmp-input-total)",
            value=budget.total,
        )
        yield CounterMetricFamily(
            "qmpd_qmp_input_refusals",
            "Unfinished QMP messages discarded because the input total was reached",
            value=budget.refusals,
        )
