"""Fault points: parsed strictly, inert when unset, a SIGKILL at exactly the armed reach."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus import faults

REPO = Path(__file__).resolve().parents[3]

SCRIPT = """
from rlbus import faults
for i in range(1, 4):
    print("before", i, flush=True)
    faults.point("trainer.before_batch_ack")
    faults.point("orchestrator.before_compaction")
    print("after", i, flush=True)
"""


def run_script(spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    if spec is not None:
        env[faults.ENV_VAR] = spec
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=60
    )


def test_parse_reads_names_and_counts():
    assert faults.parse("trainer.before_batch_ack:3, orchestrator.before_result_ack") == {
        "trainer.before_batch_ack": 3, "orchestrator.before_result_ack": 1}  # fmt: skip
    assert faults.parse("") == {}


@pytest.mark.parametrize(("spec", "problem"), [
    ("trainer.before_ack", r"unknown fault point 'trainer.before_ack'; known: .*trainer.before_batch_ack"),
    ("trainer.before_batch_ack:0", r"'trainer.before_batch_ack:0' has count '0'; expected a positive integer"),
    ("trainer.before_batch_ack:x", r"has count 'x'"),
])  # fmt: skip
def test_parse_names_what_is_wrong(spec, problem):
    with pytest.raises(ValueError, match=problem):
        faults.parse(spec)


def test_the_process_dies_by_sigkill_at_the_armed_reach_and_not_before():
    done = run_script("trainer.before_batch_ack:2")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split("\n")[:4] == ["before 1", "after 1", "before 2", ""]
    assert "fault point trainer.before_batch_ack" in done.stderr


def test_unset_or_unreached_points_do_nothing():
    for spec in (None, "orchestrator.before_result_ack"):
        done = run_script(spec)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("after") == 3


def test_a_bad_variable_stops_the_process_at_import_with_the_reason():
    done = run_script("trainer.nowhere")
    assert done.returncode != 0 and "unknown fault point 'trainer.nowhere'" in done.stderr


def test_arm_counts_down_in_process(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    faults.arm("orchestrator.before_result_ack:2")
    try:
        faults.point("orchestrator.before_result_ack")
        assert kills == []
        faults.point("orchestrator.before_result_ack")
        assert kills == [signal.SIGKILL]
    finally:
        faults.arm("")


def test_every_fault_point_is_placed_in_the_code():
    sources = "\n".join(p.read_text() for folder in ("common", "services") for p in (REPO / folder).rglob("*.py"))
    placed = set(re.findall(r"faults\.point\(\"([a-z_.]+)\"\)", sources))
    assert placed == set(faults.POINTS)
