"""``rlbus tail``: a live view of a running job, from any host that reaches the monitor.

A DEALER asks the monitor's ``monitor_view`` ROUTER for a ``ViewSnapshot``
every ``interval_s``: the latest step's metrics, service health and the log
lines since the last answer. On a terminal the view is redrawn in place;
otherwise new log lines and one status line per refresh are printed, or,
with ``--json``, one JSON object per refresh.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from typing import TextIO

import msgspec
import zmq

from rlbus.bus import Bus, BusSocket
from rlbus.messages import Refused, ServiceHealth, ViewRequest, ViewSnapshot
from rlbus.services.monitor.config import DEFAULT_SUMMARY_METRICS, TailConfig
from rlbus.services.monitor.steps import format_value

CLEAR_SCREEN = "\x1b[H\x1b[2J"
RED, RESET = "\x1b[31m", "\x1b[0m"


class MonitorUnreachable(RuntimeError):
    """The monitor did not answer within ``timeout_s``."""


class ViewRefused(RuntimeError):
    """The monitor refused the request (wrong or missing api key)."""


class ViewClient:
    """Asks the monitor for snapshots; a fresh socket after each timeout (no stale replies)."""

    def __init__(self, bus: Bus, config: TailConfig) -> None:
        self.bus, self.config = bus, config
        self.address = config.monitor_address or config.bus.endpoints.monitor_view
        self.log_offset = 0
        self.sock: BusSocket = self._connect()

    def _connect(self) -> BusSocket:
        return self.bus.connect(zmq.DEALER, self.address, "view")

    def snapshot(self) -> ViewSnapshot:
        request = ViewRequest(log_offset=self.log_offset, api_key=self.config.api_key)
        self.bus.send(self.sock, request)
        reply = self.bus.recv_before(self.sock, time.monotonic() + self.config.timeout_s, (ViewSnapshot, Refused))
        if reply is None:
            # A reply that arrives later must not answer the next request: drop the socket.
            self.sock.close(linger=0)
            self.sock = self._connect()
            raise MonitorUnreachable(f"no answer from the monitor at {self.address} within {self.config.timeout_s:g}s")
        if isinstance(reply, Refused):
            raise ViewRefused(f"the monitor at {self.address} refused the live view: {reply.reason}")
        self.log_offset = reply.log_offset
        return reply


class TailView:
    """Renders snapshots for a terminal, a pipe, or as JSON lines."""

    def __init__(self, out: TextIO, json_lines: bool, is_tty: bool, num_log_lines: int) -> None:
        self.out, self.json_lines, self.is_tty = out, json_lines, is_tty
        self.recent: deque[str] = deque(maxlen=num_log_lines)

    def show(self, snapshot: ViewSnapshot, address: str) -> None:
        if self.json_lines:
            self.out.write(msgspec.json.encode(snapshot).decode() + "\n")
        elif self.is_tty:
            self.recent.extend(snapshot.log_lines)
            self.out.write(CLEAR_SCREEN + render_screen(snapshot, address, list(self.recent)))
        else:
            self.out.write("".join(line + "\n" for line in snapshot.log_lines) + status_line(snapshot) + "\n")
        self.out.flush()

    def problem(self, text: str) -> None:
        """Show that the monitor is not answering without losing the last view."""
        if self.json_lines:
            self.out.write(msgspec.json.encode({"error": text, "time": time.time()}).decode() + "\n")
        else:
            self.out.write(f"[{time.strftime('%H:%M:%S')}] {text}; retrying\n")
        self.out.flush()


def status_line(snapshot: ViewSnapshot) -> str:
    alive = sum(row.alive for row in snapshot.health)
    parts = [f"step {snapshot.step if snapshot.step is not None else '-'}"]
    parts += [f"{name} {format_value(snapshot.metrics[name])}" for name in key_metrics(snapshot.metrics)]
    parts.append(f"{alive}/{len(snapshot.health)} replicas alive")
    dead = [f"{row.service}/{row.replica_id}" for row in snapshot.health if not row.alive and row.status == "dead"]
    if dead:
        parts.append("DEAD: " + ", ".join(dead))
    stalled = [f"{row.service}/{row.replica_id}" for row in snapshot.health if row.status == "stalled"]
    if stalled:
        parts.append("STALLED: " + ", ".join(stalled))
    return " | ".join(parts)


def key_metrics(metrics: dict[str, float]) -> list[str]:
    return [name for name in DEFAULT_SUMMARY_METRICS if name in metrics]


def render_screen(snapshot: ViewSnapshot, address: str, recent: list[str]) -> str:
    width = shutil.get_terminal_size((120, 40)).columns
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.sent_at or time.time()))
    lines = [f"rlbus tail  monitor {address}  {stamp}", "", status_line(snapshot), ""]
    lines += metric_columns(snapshot.metrics, width)
    lines += ["", *health_table(snapshot.health, snapshot.sent_at), "", "recent:"]
    lines += [line[:width] for line in recent]
    return "\n".join(lines) + "\n"


def metric_columns(metrics: dict[str, float], width: int) -> list[str]:
    names = key_metrics(metrics) + sorted(set(metrics) - set(key_metrics(metrics)))
    cells = [f"{name:<28} {format_value(metrics[name]):>10}" for name in names]
    per_row = max(1, width // 42)
    return ["   ".join(cells[i:i + per_row]) for i in range(0, len(cells), per_row)]


def health_table(rows: list[ServiceHealth], now: float) -> list[str]:
    lines = [f"{'service':<14} {'replica':<24} {'status':<9} {'step':>6} {'seen':>6}  waiting for"]
    for row in rows:
        status = row.status.upper() if not row.alive or row.status == "stalled" else row.status
        waiting = row.waiting_for or ""
        if row.waiting_for and row.waiting_since is not None and now >= row.waiting_since:
            waiting += f" ({now - row.waiting_since:.0f}s)"
        line = (f"{row.service:<14} {row.replica_id:<24} {status:<9} {_dash(row.step):>6} "
                f"{now - row.last_seen:>5.0f}s  {waiting}")  # fmt: skip
        lines.append(f"{RED}{line}{RESET}" if row.status in ("dead", "stalled") else line)
    return lines


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def run_tail(config: TailConfig, out: TextIO = sys.stdout) -> int:
    """Refresh until Ctrl-C (or once with ``once``): 0 when shown, 1 when the monitor is unreachable or refuses."""
    view = TailView(out, config.json_lines, out.isatty() and not config.json_lines, config.num_log_lines)
    with Bus(config.bus) as bus:
        client = ViewClient(bus, config)
        while True:
            try:
                view.show(client.snapshot(), client.address)
            except ViewRefused as exc:
                sys.stderr.write(f"rlbus tail: {exc}\n")
                return 1
            except MonitorUnreachable as exc:
                if config.once:
                    sys.stderr.write(f"rlbus tail: {exc}\n")
                    return 1
                view.problem(str(exc))
            if config.once:
                return 0
            time.sleep(config.interval_s)  # the refresh period, not a wait for a peer
