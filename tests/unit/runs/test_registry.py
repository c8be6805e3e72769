"""The run registry without processes of its own: status rules, records on disk, liveness by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.services.runs import process
from rlbus.services.runs.progress import read_progress
from rlbus.services.runs.registry import (
    COMPLETED,
    FAILED,
    RUNNING,
    STOPPED,
    STOPPING,
    Registry,
    RunRecord,
    UnknownRun,
    status_of,
    write_atomically,
)


def record(run_id: str = "abcd1234", **changes) -> RunRecord:
    values = {"id": run_id, "name": "demo", "model": "models/tiny", "output_dir": "/tmp/run", "console": "/tmp/c.out",
              "argv": ["@", "rl.toml"], "cwd": "/tmp", "host": "here", "started": 1000.0}  # fmt: skip
    return RunRecord(**{**values, **changes})


@pytest.mark.parametrize(
    ("changes", "alive", "expected"),
    [
        ({}, True, RUNNING),
        ({"stop_requested": 5.0}, True, STOPPING),
        ({}, False, FAILED),  # died without recording an exit: killed -9, the machine rebooted
        ({"stop_requested": 5.0}, False, STOPPED),
        ({"exit_code": 0, "ended": 9.0}, False, COMPLETED),
        ({"exit_code": 1, "ended": 9.0}, False, FAILED),
        ({"exit_code": -9, "ended": 9.0}, False, FAILED),
        ({"exit_code": 143, "ended": 9.0, "stop_requested": 5.0}, False, STOPPED),
        ({"exit_code": 0, "ended": 9.0}, True, COMPLETED),  # the recorded exit wins over a reused pid
    ],
)
def test_status_follows_the_record_and_liveness(changes, alive, expected):
    assert status_of(record(**changes), alive) == expected


def test_records_round_trip_and_updates_keep_other_fields(tmp_path):
    registry = Registry(tmp_path)
    registry.save(record(pid=42, envs=["reverse-text"]))
    registry.update("abcd1234", stop_requested=7.0)
    registry.update("abcd1234", exit_code=143, ended=8.0)
    loaded = registry.load("abcd1234")
    assert (loaded.pid, loaded.envs, loaded.stop_requested, loaded.exit_code) == (42, ["reverse-text"], 7.0, 143)
    assert json.loads((tmp_path / "runs" / "abcd1234.json").read_text())["exit_code"] == 143


def test_records_are_replaced_atomically(tmp_path, monkeypatch):
    target = tmp_path / "runs" / "r.json"
    write_atomically(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, "new\n")
    # The old record is whole, and no temp file is left behind.
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_unreadable_records_are_skipped_and_listed_oldest_first(tmp_path):
    registry = Registry(tmp_path)
    registry.save(record("bbbb0000", started=2.0))
    registry.save(record("aaaa0000", started=3.0))
    (tmp_path / "runs" / "cut.json").write_text('{"id": "cut", "na')
    assert [r.id for r in registry.records()] == ["bbbb0000", "aaaa0000"]


def test_an_unknown_id_suggests_the_closest(tmp_path):
    registry = Registry(tmp_path)
    registry.save(record("3f2a9c1e"))
    registry.save(record("77aa0b12"))
    with pytest.raises(UnknownRun, match=r"no run '3f2a9c1f' \(did you mean '3f2a9c1e'\?\)"):
        registry.load("3f2a9c1f")
    with pytest.raises(UnknownRun, match="'rlbus list' shows every run"):
        registry.load("zzzzzzzz")
    with pytest.raises(UnknownRun, match="no runs are recorded yet"):
        Registry(tmp_path / "empty").load("3f2a9c1e")


def test_a_unique_start_of_an_id_is_enough(tmp_path):
    registry = Registry(tmp_path)
    registry.save(record("3f2a9c1e"))
    registry.save(record("3f00aa11"))
    assert registry.load("3f2").id == "3f2a9c1e"
    with pytest.raises(UnknownRun, match="ambiguous"):
        registry.load("3f")


def test_new_ids_are_short_and_unused(tmp_path):
    registry = Registry(tmp_path)
    ids = {registry.new_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 8 and int(i, 16) >= 0 for i in ids)


def test_a_live_pid_is_alive_only_with_its_own_start_time():
    stat = process.proc_stat(os.getpid())
    assert stat is not None
    assert process.is_alive(record(pid=os.getpid(), pid_start=stat.start_ticks, boot_id=process.boot_id()))
    # The same pid with another start time: reused after a reboot, not our run.
    assert not process.is_alive(record(pid=os.getpid(), pid_start=stat.start_ticks + 1))
    assert not process.is_alive(record(pid=os.getpid(), pid_start=stat.start_ticks, boot_id="another-boot"))
    assert not process.is_alive(record(pid=None))


def test_exited_and_zombie_pids_are_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while process.proc_stat(child.pid) is not None and process.proc_stat(child.pid).state != "Z":
        pass  # exited but not reaped yet: a zombie
    assert not process.is_alive(record(pid=child.pid))
    child.wait()
    assert not process.is_alive(record(pid=child.pid))


def test_progress_is_read_from_the_ends_of_the_run_files(tmp_path: Path):
    (tmp_path / "steps.jsonl").write_text('{"step": 1}\n{"step": 2, "orchestrator/reward/all/mean": 0.5}\n{"st')
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "service": "orchestrator", "reward/all/mean": 0.25}\n'
        '{"step": 3, "service": "orchestrator", "reward/all/mean": 0.75}\n{"step": 3, "service": "trainer"}\n'
    )
    assert read_progress(tmp_path) == (2, 0.75)
    assert read_progress(tmp_path / "nothing") == (None, None)
