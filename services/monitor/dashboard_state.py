"""What the dashboard page shows, as JSON, without sockets: charts, runs, service health.

:class:`Dashboard` holds one :class:`~rlbus.services.monitor.dashboard_run.RunFollower` per run
(one for the monitor's live run; one per folder for ``rlbus dashboard``) and, live, the
monitor's health table. It is shared by the HTTP server's threads and the monitor's loop:
every method takes its lock. Each change bumps :attr:`Dashboard.version`, which the
server's push channel waits on, so a page hears about a new step within one poll.

The charts are :data:`CHARTS`: the columns of :data:`rlbus.plots.CHARTS` (the PNGs drawn at the
end of a run) plus reward per environment, evaluations and off-policy steps. A chart's columns
are its fixed ones and those matching its ``pattern`` (one per environment, per evaluation).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlbus.plots import CHARTS as PNG_CHARTS
from rlbus.services.monitor.dashboard_run import RunCursor, RunFollower


@dataclass(frozen=True)
class ChartSpec:
    """One chart of the page: fixed columns (with their labels) and a pattern of more."""

    id: str
    title: str
    ylabel: str
    columns: dict[str, str]
    """``steps.jsonl`` column (or evaluation figure) -> legend label."""
    pattern: str | None = None
    """Regex of further columns (also run by the page's JavaScript), each labelled by its first group."""
    log_scale: bool = False


def _png_chart(name: str) -> ChartSpec:
    chart = next(chart for chart in PNG_CHARTS if chart.name == name)
    columns = {curve.key: curve.label for curve in chart.curves}
    return ChartSpec(chart.name, chart.title, chart.ylabel, columns, log_scale=chart.log_scale)


CHARTS = (
    ChartSpec("reward", "Reward per environment", "reward", {"orchestrator/reward/all/mean": "all envs (mean)"},
              pattern=r"^orchestrator/reward/((?!all/)[^/]+)/mean$"),
    ChartSpec("eval", "Evaluations (at their policy step)", "score", {}, pattern=r"^eval/(.+/(?:avg|pass)@\d+)$"),
    _png_chart("loss"),
    _png_chart("entropy"),
    _png_chart("mismatch_kl"),
    ChartSpec("off_policy", "Off-policy steps (policy lag of trained rollouts)", "steps",
              {"orchestrator/off_policy/mean": "mean", "orchestrator/off_policy/max": "max"}),
    _png_chart("throughput"),
    _png_chart("step_time"),
)  # fmt: skip


def wanted_columns(charts: tuple[ChartSpec, ...] = CHARTS) -> re.Pattern[str]:
    """One pattern matching every column some chart draws (the rest of a row is not kept)."""
    parts = [re.escape(key) + "$" for chart in charts for key in chart.columns]
    parts += [chart.pattern.lstrip("^") for chart in charts if chart.pattern]
    return re.compile("^(?:" + "|".join(parts) + ")")


@dataclass(frozen=True)
class Cursor:
    """What one page already has: the runs' cursors."""

    runs: tuple[RunCursor, ...]


class Dashboard:
    """Runs and live health behind a lock; :attr:`version` changes whenever either does."""

    def __init__(self, runs: list[RunFollower], live: bool = False) -> None:
        if not runs:
            raise ValueError("a dashboard needs at least one run")
        self.runs = runs
        self.live = live
        self.health: list[dict[str, Any]] = []
        self.version = 0
        self.closed = False
        self.changed = threading.Condition()

    @classmethod
    def of_folders(cls, folders: list[tuple[Path, str]], live: bool = False,
                   model: str | None = None, max_steps: int | None = None) -> Dashboard:  # fmt: skip
        """A dashboard of run folders, each ``(path, name shown)``."""
        wanted = wanted_columns()
        return cls([RunFollower(path, name, wanted, model, max_steps) for path, name in folders], live)

    def poll(self) -> bool:
        """Read what the runs' files gained; True (and waiting pages woken) when anything did."""
        with self.changed:
            news = [run.poll() for run in self.runs]  # every run, not up to the first with news
            if any(news):
                self._bump()
            return any(news)

    def set_health(self, rows: list[dict[str, Any]]) -> None:
        """The monitor's health table now (live only), one dict per replica."""
        with self.changed:
            if rows != self.health:
                self.health = rows
                self._bump()

    def _bump(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def wait_for_change(self, seen_version: int, timeout_s: float) -> int:
        """The version once it differs from ``seen_version`` (or the dashboard closed), or after
        ``timeout_s`` whatever it is."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != seen_version or self.closed, timeout=timeout_s)
            return self.version

    def close(self) -> None:
        """Wake every waiting page for good (the server is stopping)."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def state(self, cursor: Cursor | None = None, now: float | None = None) -> tuple[dict[str, Any], Cursor]:
        """The page's data newer than ``cursor`` (everything for None), and the cursor after it."""
        with self.changed:
            deltas = [run.delta(cursor.runs[index] if cursor else None) for index, run in enumerate(self.runs)]
            payload: dict[str, Any] = {
                "version": self.version, "server_time": time.time() if now is None else now, "live": self.live,
                "health": list(self.health) if self.live else None, "runs": [delta for delta, _ in deltas],
            }  # fmt: skip
            if cursor is None:
                payload["charts"] = [asdict(chart) for chart in CHARTS]
            return payload, Cursor(tuple(run_cursor for _, run_cursor in deltas))
