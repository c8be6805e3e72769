"""The monitor's loop: owns the telemetry PULL and the live-view ROUTER, feeds :class:`Monitor`.

Services PUSH telemetry without ever blocking (``rlbus.pubsub.TelemetryClient``);
while the monitor is down their messages queue up to the high-water mark and
arrive once it binds again. SIGTERM (what the launcher sends) ends the loop
after draining what already arrived, so the last steps still reach the files
and W&B.
"""

from __future__ import annotations

import os
import signal
import time

import zmq
from loguru import logger

from rlbus.bus import Bus, BusSocket, PeerUnreachable
from rlbus.identity import service_id
from rlbus.messages import Event, Heartbeat, MetricsReport, RolloutSamples, ViewRequest
from rlbus.plots import draw_run_charts
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.dashboard import publish_health, start_live_dashboard
from rlbus.services.monitor.dashboard_server import DashboardServer
from rlbus.services.monitor.monitor import MetricsSink, Monitor, SinkFanOut

TELEMETRY = (Heartbeat, MetricsReport, Event, RolloutSamples)
TICK_S = 0.5
"""How often health is checked; also the longest a SIGTERM waits to be noticed."""
MAX_BATCH = 1000
"""Telemetry messages handled per wakeup before live-view requests get their turn."""


class MonitorService:
    """Binds the monitor's sockets and runs until :meth:`stop`."""

    def __init__(self, config: MonitorConfig, monitor: Monitor, bus: Bus) -> None:
        self.monitor = monitor
        self.bus = bus
        self.dashboard: DashboardServer | None = None
        """The live dashboard, when it serves: it gets the health table at each tick."""
        endpoints = config.bus.endpoints
        self.telemetry_in: BusSocket = bus.bind(zmq.PULL, endpoints.monitor_telemetry, "telemetry")
        self.view_requests: BusSocket = bus.bind(zmq.ROUTER, endpoints.monitor_view, "view")
        self.poller = zmq.Poller()
        self.poller.register(self.telemetry_in, zmq.POLLIN)
        self.poller.register(self.view_requests, zmq.POLLIN)
        self.stopping = False
        self.replica_id = service_id("monitor")
        self._reported_bus_metrics: dict[str, float] = {}
        logger.info("monitor: telemetry at {}, live view at {}", self.telemetry_in.address, self.view_requests.address)

    def run(self) -> None:
        next_tick = time.monotonic()
        while not self.stopping:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            ready = dict(self.poller.poll(timeout_ms))
            if self.telemetry_in in ready:
                self.drain_telemetry(MAX_BATCH)
            if self.view_requests in ready:
                self.answer_views()
            if time.monotonic() >= next_tick:
                self.monitor.tick()
                self.report_bus_metrics()
                if self.dashboard is not None:  # the page's service table; its charts follow the files
                    publish_health(self.dashboard, self.monitor.health.rows())
                next_tick = time.monotonic() + TICK_S

    def report_bus_metrics(self) -> None:
        """Record the monitor's own ``bus/rejected_messages`` (and other ``bus/`` counts) like any
        service's metrics, whenever they changed: the monitor has no telemetry client of its own."""
        metrics = self.bus.stats.metrics()
        if metrics and metrics != self._reported_bus_metrics:
            self._reported_bus_metrics = metrics
            step = self.monitor.steps.highest_step or 0
            self.monitor.handle(MetricsReport(service="monitor", replica_id=self.replica_id, step=step,
                                              sent_at=time.time(), metrics=metrics))  # fmt: skip

    def stop(self, *_: object) -> None:
        """Ask the loop to end. Used as the SIGTERM handler, so it only sets a flag:
        logging from a handler could deadlock on the logger's lock."""
        self.stopping = True

    def drain_telemetry(self, limit: int | None = None) -> int:
        """Handle the telemetry already queued (at most ``limit`` messages); returns how many."""
        count = 0
        while limit is None or count < limit:
            message = self.bus.recv_before(self.telemetry_in, time.monotonic(), TELEMETRY)
            if message is None:
                break
            count += 1
            try:
                self.monitor.handle(message)  # type: ignore[arg-type]
            except ValueError as exc:  # a message that decoded but makes no sense: skip it, keep going
                self.monitor.counts["rejected"] += 1
                logger.warning("monitor: skipped a {}: {}", type(message).__name__, exc)
        return count

    def answer_views(self) -> None:
        while (received := self.bus.recv_before(self.view_requests, time.monotonic(), ViewRequest)) is not None:
            identity, request = received  # type: ignore[misc]
            try:
                self.bus.send(self.view_requests, self.monitor.view(request), identity)
            except PeerUnreachable:
                logger.debug("live-view client {!r} left before its answer", identity)


def run_monitor(config: MonitorConfig) -> int:
    """``rlbus monitor``: run until SIGTERM or Ctrl-C, then close files, the W&B run and the Prime platform
    stream, and draw the run's charts into ``<output_dir>/charts/``."""
    platform = None
    if config.prime_platform is not None:  # first: a missing key stops the monitor before it binds
        from rlbus.services.monitor.platform_run import open_platform_run

        platform = open_platform_run(config, os.environ)
    monitor: Monitor | None = None
    exit_code = 1
    try:
        monitor = Monitor(config, _sink(config, platform.stream if platform else None))
        exit_code = _serve(config, monitor)
    except KeyboardInterrupt:
        exit_code = 130
        raise
    finally:
        if platform is not None:  # a monitor alone marks the run's end; one under rlbus rl leaves it to it
            platform.finish(exit_code, monitor.finished if monitor else set(),
                            monitor.steps.highest_step if monitor else None)  # fmt: skip
    return exit_code


def _sink(config: MonitorConfig, platform: MetricsSink | None) -> MetricsSink | None:
    sinks: list[MetricsSink] = []
    if config.wandb.enabled:
        from rlbus.services.monitor.wandb_sink import WandbSink

        sinks.append(WandbSink(config))
    if platform is not None:
        sinks.append(platform)
    return sinks[0] if len(sinks) == 1 else SinkFanOut(sinks) if sinks else None


def _serve(config: MonitorConfig, monitor: Monitor) -> int:
    """The loop, until SIGTERM (0) or Ctrl-C (KeyboardInterrupt); then drain, close and draw."""
    exit_code = 1
    with Bus(config.bus) as bus:
        service = MonitorService(config, monitor, bus)
        service.dashboard = dashboard = start_live_dashboard(config)  # once the bus sockets are bound
        previous = signal.signal(signal.SIGTERM, service.stop)
        try:
            service.run()
            exit_code = 0
        except KeyboardInterrupt:
            exit_code = 130
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            drained = service.drain_telemetry()
            service.report_bus_metrics()
            monitor.close(exit_code)
            draw_run_charts(config.output_dir)  # after close: every row is on disk
            if dashboard is not None:
                dashboard.stop()
            logger.info("monitor stopped (drained {} last messages); handled {}, decode errors {}",
                        drained, dict(monitor.counts), dict(bus.stats.decode_errors))  # fmt: skip
    return exit_code
