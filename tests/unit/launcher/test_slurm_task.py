"""The node side of an array task: placeholders filled once each, per-task flags, peers found."""

import pytest

from rlbus.services.launcher.slurm_ctl import TaskState
from rlbus.services.launcher.slurm_task import PeerFinder, RendezvousError, fill_placeholders, task_args


def test_each_placeholder_is_looked_up_once_and_unknown_ones_stay():
    asked = []

    def address_of(section: str, index: int) -> str | None:
        asked.append((section, index))
        return None if section == "trainer" else f"{section}{index}.cluster"

    text = 'a = "tcp://{monitor}:1"\nb = "tcp://{monitor}:2"\nc = "http://{inference.3}:8003"\nd = "{trainer}"'
    filled = fill_placeholders(text, address_of)
    assert filled == 'a = "tcp://monitor0.cluster:1"\nb = "tcp://monitor0.cluster:2"\n' \
                     'c = "http://inference3.cluster:8003"\nd = "{trainer}"'
    assert asked == [("monitor", 0), ("inference", 3), ("trainer", 0)]


def test_array_tasks_become_distinct_replicas():
    assert task_args("env-worker", {}, 2, lambda: "n") == ["--worker-id", "env-worker-2"]
    assert task_args("inference", {"port": 8000}, 1, lambda: "10.0.0.9") == [
        "--port", "8001", "--replica-id", "inference-1", "--advertise-url", "http://10.0.0.9:8001/v1"]
    assert task_args("inference", {"port": 8000, "replica_id": "r", "advertise_url": "u"}, 0, lambda: "x") == [
        "--port", "8000"]
    assert task_args("trainer", {}, 0, lambda: "x") == []


class FakeCtl:
    """The controller's answers, one list of tasks per poll (a unit test of PeerFinder alone)."""

    def __init__(self, polls: list[list[TaskState]]) -> None:
        self.polls = polls

    def tasks(self, ids):
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]

    def node_address(self, node: str) -> str:
        return f"addr-of-{node}"


def test_a_peer_is_found_once_it_runs(monkeypatch):
    monkeypatch.setattr("rlbus.services.launcher.slurm_task.WAIT_POLL_S", 0.0)
    ctl = FakeCtl([[TaskState("7", 0, "7", "PENDING", "")], [TaskState("7", 0, "8", "RUNNING", "n3")]])
    finder = PeerFinder(ctl, "trainer", {"monitor": "7"}, timeout_s=60)
    assert finder.address_of("monitor", 0) == "addr-of-n3"
    assert finder.address_of("orchestrator", 0) is None  # not a peer: its placeholder stays


def test_a_peer_that_ended_or_never_ran_fails_the_task(monkeypatch):
    monkeypatch.setattr("rlbus.services.launcher.slurm_task.WAIT_POLL_S", 0.0)
    ended = PeerFinder(FakeCtl([[TaskState("7", 0, "8", "FAILED", "n3")]]), "trainer", {"monitor": "7"}, 60)
    with pytest.raises(RendezvousError, match=r"monitor task 7_0 ended \(FAILED\)"):
        ended.address_of("monitor", 0)
    pending = PeerFinder(FakeCtl([[TaskState("7", 0, "7", "PENDING", "")]]), "trainer", {"monitor": "7"}, 0.01)
    with pytest.raises(RendezvousError, match="not running within"):
        pending.address_of("monitor", 0)
    monkeypatch.setenv("SLURMD_NODENAME", "n9")
    assert pending.address_of("self", 0) == "addr-of-n9" == pending.address_of("trainer", 0)
