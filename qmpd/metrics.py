"""Prometheus metrics of one daemon, in a registry of its own."""

from __future__ import annotations

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

from qmpd import __version__
from qmpd.runstate import RunState

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

    def observe_activation(self, seconds: float) -> None:
        self.activations.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
