"""The dashboard's reading of run folders: whole lines only, what each chart needs, deltas per page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlbus.services.monitor.dashboard_run import MAX_TEXT_CHARS, Journal, JsonlFollower, RunFollower
from rlbus.services.monitor.dashboard_state import CHARTS, Dashboard, wanted_columns


def append(path: Path, *rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def step_row(step: int, time: float, reward: float, **extra: float) -> dict:
    return {"step": step, "time": time, "elapsed_s": time - 1000.0, "complete": True,
            "orchestrator/reward/all/mean": reward, "orchestrator/reward/reverse-text/mean": reward,
            "orchestrator/batch/num_samples": 8.0, "trainer/loss/mean": -reward, **extra}  # fmt: skip


def follower(run: Path, **kwargs) -> RunFollower:
    return RunFollower(run, run.name, wanted_columns(), **kwargs)


def test_a_line_still_being_written_waits_for_its_end(tmp_path):
    path = tmp_path / "steps.jsonl"
    reader = JsonlFollower(path)
    assert reader.read_new() == ([], False)  # no file yet
    path.write_text('{"step": 1}\n{"step": 2, "x"')
    assert reader.read_new() == ([{"step": 1}], False)
    with path.open("a") as handle:
        handle.write(": 1}\nnot json\n")
    assert reader.read_new() == ([{"step": 2, "x": 1}], False)  # the bad line is skipped
    path.write_text('{"step": 9}\n')  # replaced by a shorter file: read again from its start
    assert reader.read_new() == ([{"step": 9}], True)


def test_a_journal_keeps_the_latest_items_and_their_numbers():
    journal: Journal[int] = Journal(maxlen=3)
    for item in range(5):
        journal.append(item)
    assert journal.end == 5
    assert journal.since(0) == [2, 3, 4]  # the two oldest fell off
    assert journal.since(4) == [4]
    assert journal.since(5) == []


def test_charts_get_their_columns_evaluations_and_environments(tmp_path):
    run = tmp_path / "run"
    append(run / "steps.jsonl", step_row(1, 1010.0, 0.25), step_row(2, 1020.0, 0.5))
    append(run / "metrics.jsonl", {"step": 2, "service": "orchestrator", "replica_id": "o", "time": 1021.0,
                                   "eval/rev/avg@4": 0.75, "eval/rev/num_examples": 8.0})  # fmt: skip
    reader = follower(run)
    assert reader.poll()
    payload, _ = reader.delta(None)
    assert payload["series"] == {
        "orchestrator/reward/all/mean": [[1, 0.25], [2, 0.5]],
        "orchestrator/reward/reverse-text/mean": [[1, 0.25], [2, 0.5]],
        "trainer/loss/mean": [[1, -0.25], [2, -0.5]],
        "eval/rev/avg@4": [[2, 0.75]],
    }  # fmt: skip  (batch sizes and num_examples are no chart's)
    assert payload["overview"]["envs"] == ["reverse-text"] and payload["overview"]["step"] == 2
    assert not reader.poll()  # nothing new


def test_deltas_send_only_what_a_page_lacks_and_everything_after_a_restart(tmp_path):
    run = tmp_path / "run"
    append(run / "steps.jsonl", step_row(1, 1010.0, 0.25))
    append(run / "events.jsonl", {"time": 1.0, "service": "trainer", "replica_id": "t", "level": "info",
                                  "kind": "started", "message": "up", "pid": 4})  # fmt: skip
    reader = follower(run)
    reader.poll()
    first, cursor = reader.delta(None)
    assert first["reset"] and len(first["events"]) == 1 and "pid" not in first["events"][0]
    append(run / "steps.jsonl", step_row(2, 1020.0, 0.5))
    reader.poll()
    second, cursor = reader.delta(cursor)
    assert not second["reset"] and second["events"] == []
    assert second["series"]["orchestrator/reward/all/mean"] == [[2, 0.5]]
    (run / "steps.jsonl").write_text(json.dumps(step_row(1, 2010.0, 0.125)) + "\n")  # a new run in the folder
    reader.poll()
    third, _ = reader.delta(cursor)
    assert third["reset"] and third["series"]["orchestrator/reward/all/mean"] == [[1, 0.125]]
    assert third["events"] == [{"time": 1.0, "service": "trainer", "replica_id": "t", "level": "info",
                                "kind": "started", "message": "up"}]  # fmt: skip


def test_overview_takes_model_and_max_steps_from_the_resolved_config_and_estimates_the_end(tmp_path):
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "monitor.toml").write_text('model = "models/tiny"\nmax_steps = 10\n')
    append(run / "steps.jsonl", step_row(1, 1010.0, 0.0), step_row(3, 1030.0, 0.0))
    reader = follower(run)
    reader.poll()
    overview = reader.overview()
    assert overview["model"] == "models/tiny" and overview["max_steps"] == 10 and overview["step"] == 3
    assert overview["started_at"] == 1000.0 and overview["elapsed_s"] == 30.0
    assert overview["eta_s"] == pytest.approx(10.0 * 7)  # 10 s per step between the rows read, 7 steps to go
    assert not overview["finished"]
    append(run / "events.jsonl", {"time": 1.0, "service": "orchestrator", "replica_id": "o", "level": "info",
                                  "kind": "finished", "message": "all 3 steps trained"})  # fmt: skip
    reader.poll()
    assert reader.overview()["finished"] and reader.overview()["eta_s"] is None


def test_samples_are_cut_for_the_page_and_name_their_environment(tmp_path):
    run = tmp_path / "run"
    append(run / "samples.jsonl", {"step": 1, "time": 1.0, "env_id": "arith", "prompt": "p" * (MAX_TEXT_CHARS + 50),
                                   "completion": [{"role": "assistant", "content": "4"}], "answer": "4",
                                   "reward": 1.0, "advantage": 0.5, "policy_step": 0})  # fmt: skip
    reader = follower(run, model="m", max_steps=2)
    reader.poll()
    sample = reader.delta(None)[0]["samples"][0]
    assert len(sample["prompt"]) == MAX_TEXT_CHARS + 2 and sample["prompt"].endswith(" …")
    assert json.loads(sample["completion"]) == [{"role": "assistant", "content": "4"}]
    assert (sample["reward"], sample["advantage"], sample["env_id"]) == (1.0, 0.5, "arith")
    assert reader.overview()["envs"] == ["arith"]


def test_every_fixed_chart_column_is_read_and_a_dashboard_bumps_its_version_on_news(tmp_path):
    wanted = wanted_columns()
    for chart in CHARTS:
        assert all(wanted.match(key) for key in chart.columns), chart.id
    assert not wanted.match("orchestrator/reward/all/std") and wanted.match("orchestrator/reward/arith/mean")
    run = tmp_path / "run"
    dashboard = Dashboard.of_folders([(run, "run")], live=True)
    assert not dashboard.poll() and dashboard.version == 0
    append(run / "steps.jsonl", step_row(1, 1010.0, 0.5))
    assert dashboard.poll() and dashboard.version == 1
    dashboard.set_health([{"service": "trainer", "status": "dead"}])
    payload, cursor = dashboard.state()
    assert payload["version"] == 2 and payload["health"] == [{"service": "trainer", "status": "dead"}]
    assert [chart["id"] for chart in payload["charts"]] == [chart.id for chart in CHARTS]
    again, _ = dashboard.state(cursor)
    assert "charts" not in again and again["runs"][0]["series"] == {}
