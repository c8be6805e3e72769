"""scripts/chaos.py: which runs it makes, where their kills fall, and its table."""

import importlib.util
import sys
from pathlib import Path

from rlbus import faults
from tests.integration.chaos_audit import Audit
from tests.integration.chaos_run import Recovery

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("chaos_script", ROOT / "scripts" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
sys.modules["chaos_script"] = chaos  # dataclasses look their module up there
spec.loader.exec_module(chaos)


def test_by_default_one_run_per_async_level_with_every_kill_after_the_fault_points():
    plans = chaos.make_plans([0, 1], list(chaos.SERVICES), separate=False, with_faults=True)
    assert [(p.async_level, p.services, p.faults) for p in plans] == [
        (0, list(chaos.SERVICES), chaos.FAULTS), (1, list(chaos.SERVICES), chaos.FAULTS)]  # fmt: skip
    assert plans[0].kill_steps() == [6, 8, 10, 12, 14] and plans[0].max_steps() == 21
    armed = {point.split(":")[0] for specs in chaos.FAULTS.values() for point in specs}
    assert armed == set(faults.POINTS)  # every fault point is exercised


def test_separate_runs_and_a_run_without_faults():
    plans = chaos.make_plans([1], ["trainer", "monitor"], separate=True, with_faults=True)
    assert [p.name for p in plans] == ["async1-trainer", "async1-monitor", "async1-faults"]
    (plain,) = chaos.make_plans([0], ["trainer"], separate=False, with_faults=False)
    assert plain.kill_steps() == [2] and plain.max_steps() == 9 and not plain.faults


def test_the_table_has_a_row_per_kill_with_the_audit():
    result = Audit(max_steps=2, trained_steps=[1, 2], num_acked=4, trained_twice=["x"], lost=["y", "z"])
    recovery = Recovery("orchestrator", 3, how="orchestrator.before_result_ack", ready_s=1.0, recovery_s=2.5)
    header, row = chaos.table([(0, recovery, result)]).splitlines()
    assert header.split()[:3] == ["async", "process", "killed"]
    assert row.split() == ["0", "orchestrator", "orchestrator.before_result_ack", "3", "1.0", "2.5", "yes", "1", "0",
                           "2", "4", "0", "0"]  # fmt: skip
