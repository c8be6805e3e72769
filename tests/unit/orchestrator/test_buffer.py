"""Group buffer: stale groups are dropped and counted, restored groups come back in order."""

from rlbus.messages import RolloutTask, SamplingParams
from rlbus.services.orchestrator.buffer import Group, GroupBuffer
from rlbus.services.orchestrator.sampler import Draw

from .fakes import roll_out


def group(task_id: str, policy_step: int, num_rollouts: int = 2) -> Group:
    task = RolloutTask(task_id=task_id, env_id="e", example_id=0, num_rollouts=num_rollouts,
                       sampling=SamplingParams(), lease_s=0, issued_at=0)  # fmt: skip
    return Group(task_id, "e", Draw(0, 0), roll_out(task, policy_step).rollouts)


def test_stale_counts_are_reported_once_and_start_again():
    buffer = GroupBuffer(max_off_policy_steps=1)
    assert not buffer.add(group("old", policy_step=0, num_rollouts=3), step=3)  # 2 steps behind: refused
    assert buffer.add(group("g1", policy_step=2), step=3) and buffer.add(group("g2", policy_step=2), step=3)
    assert [g.task_id for g in buffer.drop_stale(step=5)] == ["g1", "g2"]
    assert buffer.take_stale_counts() == (3, 7)
    assert buffer.take_stale_counts() == (0, 0)


def test_restored_groups_are_taken_in_their_order_and_dropped_when_stale():
    buffer = GroupBuffer(max_off_policy_steps=0)
    buffer.restore([group("old", policy_step=0), group("a", policy_step=1), group("b", policy_step=1)])
    assert len(buffer) == 3 and buffer.take_stale_counts() == (0, 0)  # restoring checks nothing
    assert [g.task_id for g in buffer.take(step=2, count=2)] == ["a", "b"]
    assert buffer.take_stale_counts() == (1, 2)
