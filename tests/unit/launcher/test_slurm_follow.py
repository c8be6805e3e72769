"""What the launcher does as the tasks of a SLURM run change state (a scripted controller)."""

from pathlib import Path

from rlbus.services.launcher.slurm import RunFollower, SubmittedArray
from rlbus.services.launcher.slurm_ctl import TaskState
from rlbus.services.run_config import RlConfig

ARRAYS = [
    SubmittedArray("monitor", "monitor", "1", 1, "j-monitor", "failure"),
    SubmittedArray("orchestrator", "orchestrator", "2", 1, "j-orchestrator", "done"),
    SubmittedArray("trainer", "trainer", "3", 1, "j-trainer", "finished"),
    SubmittedArray("inference", "inference", "4", 1, "j-inference", "failure"),
    SubmittedArray("env_worker", "env-worker", "5", 2, "j-env-worker", "failure"),
]


class ScriptedCtl:
    """Every task RUNNING; ``script`` says which (array, task) ends with which exit at which poll."""

    def __init__(self, script: dict[int, list[tuple[str, int, str, int]]]) -> None:
        self.script, self.polls = script, 0
        self.states = {(a.array_job_id, i): ("RUNNING", 0) for a in ARRAYS for i in range(a.num_tasks)}
        self.cancelled: list[list[str]] = []

    def tasks(self, ids):
        self.polls += 1
        for array_id, task_id, state, code in self.script.get(self.polls, []):
            self.states[(array_id, task_id)] = (state, code)
        return [TaskState(a, t, f"{a}{t}", state, "n1") for (a, t), (state, _) in self.states.items()]

    def exit_code(self, job_id: str) -> int:
        return next(code for (a, t), (_, code) in self.states.items() if f"{a}{t}" == job_id)

    def cancel(self, ids) -> None:
        ids = list(ids)
        self.cancelled.append(ids)
        for (array_id, task_id), (state, _) in list(self.states.items()):
            if array_id in ids and state == "RUNNING":
                self.states[(array_id, task_id)] = ("CANCELLED", -15)

    def node_address(self, node: str) -> str:
        return node


def follow(ctl: ScriptedCtl, tmp_path: Path) -> int:
    config = RlConfig(output_dir=tmp_path, stop_timeout_s=5, slurm={"poll_interval_s": 0.01, "stream_logs": False,
                                                                    "cancel_timeout_s": 5})  # fmt: skip
    return RunFollower(config, ctl, ARRAYS).run()


def test_orchestrator_done_waits_for_the_trainer_then_cancels_the_rest_monitor_last(tmp_path):
    ctl = ScriptedCtl({3: [("2", 0, "COMPLETED", 0)], 5: [("3", 0, "COMPLETED", 0)]})
    assert follow(ctl, tmp_path) == 0
    assert ctl.cancelled == [["4", "5"], ["1"]]  # finished arrays are not cancelled again


def test_a_failed_task_fails_the_run_and_everything_is_cancelled(tmp_path):
    ctl = ScriptedCtl({2: [("5", 1, "FAILED", 2)]})
    assert follow(ctl, tmp_path) == 1
    assert ctl.cancelled == [["2", "3", "4", "5"], ["1"]]
    assert all(state != "RUNNING" for state, _ in ctl.states.values())


def test_a_task_ended_by_slurm_with_code_0_is_a_failure(tmp_path):
    ctl = ScriptedCtl({2: [("4", 0, "TIMEOUT", 0)]})
    assert follow(ctl, tmp_path) == 1
