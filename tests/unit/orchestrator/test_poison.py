"""One bad task, result or number cannot stall or poison the orchestrator core."""

import math

import pytest

from rlbus.messages import MAX_ABS_REWARD

from .fakes import roll_out
from .test_core import Clock, finish, load_policy, make_config, make_core, request_tasks


def expire_leases(core, clock, lease_s, times, identity=b"dead"):
    """Lease every queued task to ``identity`` and let the lease run out, ``times`` times."""
    leased = []
    for _ in range(times):
        leased = request_tasks(core, num_tasks=100, identity=identity)
        clock.now += lease_s + 1
        core.tick()
    return leased


def test_a_task_whose_result_never_arrives_is_abandoned_and_replaced_by_a_fresh_draw(tmp_path):
    clock = Clock()
    core = make_core(make_config(tmp_path, task_lease_s=10, max_task_issues=3), clock=clock)
    first = request_tasks(core, num_tasks=1, identity=b"black-hole")
    poison = first[0]
    for _ in range(2):  # issued twice more, each time the lease runs out
        clock.now += 11
        again = request_tasks(core, num_tasks=1, identity=b"black-hole")
        assert [t.task_id for t in again] == [poison.task_id]
    clock.now += 11
    outbox = core.tick()
    assert poison.task_id not in core.ledger.open and core.ledger.num_open() == 2  # a fresh draw took its place
    ((_, text, level, fields),) = [e for e in outbox.events if e[0] == "task_abandoned"]
    assert level == "warning" and fields["task_id"] == poison.task_id
    assert "issued 3 times" in text and "lease of 10s expired" in text
    # The run goes on: the other tasks and the replacement make step 1.
    tasks = request_tasks(core, num_tasks=100, identity=b"good")
    assert poison.task_id not in {t.task_id for t in tasks}
    outbox = finish(core, tasks, 0)
    ((step, metrics),) = outbox.metrics
    assert step == 1 and metrics["dropped/abandoned_tasks"] == 1
    late = core.on_result(roll_out(poison, 0))
    assert not late.accepted and "abandoned" in late.reason


def test_an_unreadable_result_is_refused_and_issues_its_task_again_until_it_is_abandoned(tmp_path):
    core = make_core(make_config(tmp_path, max_task_issues=2))
    (task,) = request_tasks(core, num_tasks=1, identity=b"w")
    refusal = core.on_unreadable_result(b"w", task.task_id, "RolloutResult: invalid body")
    assert refusal.task_ids == [task.task_id] and not refusal.accepted and "unreadable" in refusal.reason
    (again,) = request_tasks(core, num_tasks=1, identity=b"w")  # at once, not after the lease
    assert again.task_id == task.task_id
    # Another peer naming a task it does not hold cannot fail it.
    core.on_unreadable_result(b"someone-else", task.task_id, "forged")
    assert task.task_id in core.ledger.open
    core.on_unreadable_result(b"w", task.task_id, "RolloutResult: invalid body")
    core.tick()
    assert task.task_id in core.ledger.abandoned


def test_an_abandoned_eval_task_lets_its_round_finish(tmp_path):
    clock = Clock()
    config = make_config(
        tmp_path,
        task_lease_s=10,
        max_task_issues=1,
        eval={"interval": 1, "env": [{"id": "a", "num_examples": 2, "rollouts_per_example": 2}]},
    )
    core = make_core(config, clock=clock)
    load_policy(core, 0)
    evals = [t for t in request_tasks(core, num_tasks=100, identity=b"w") if t.is_eval]
    assert len(evals) == 2
    assert core.on_result(roll_out(evals[0], 0, rewards=[1.0, 1.0])).accepted
    clock.now += 11
    outbox = core.tick()  # the other eval task's lease expires: with one issue allowed, it is given up
    ((policy_step, metrics),) = [m for m in outbox.metrics if "eval/a/avg@2" in m[1]]
    assert policy_step == 0 and metrics["eval/a/avg@2"] == 1.0 and metrics["eval/a/abandoned_tasks"] == 1
    assert not core.evals.rounds


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("reward", float("nan"), "reward nan is not finite"),
    ("reward", 1e39, f"exceeds {MAX_ABS_REWARD:g}"),
    ("reward_breakdown", {"acc": float("inf")}, "reward_breakdown holds non-finite values {'acc': inf}"),
    ("metrics", {"len": float("nan")}, "metrics holds non-finite values"),
    ("timing", {"generate_s": float("-inf")}, "timing holds non-finite values"),
])  # fmt: skip
def test_non_finite_or_huge_numbers_anywhere_in_a_result_are_refused_naming_the_field(tmp_path, field, value,
                                                                                       expected):  # fmt: skip
    core = make_core(make_config(tmp_path))
    tasks = request_tasks(core)
    for errored in (False, True):  # an errored rollout is journaled too: its numbers must be finite as well
        result = roll_out(tasks[int(errored)], 0)
        result.rollouts[1].error = "env crashed" if errored else None
        setattr(result.rollouts[1], field, value)
        refused = core.on_result(result)
        assert not refused.accepted and "rollout 1" in refused.reason and expected in refused.reason


def test_an_unmasked_nan_logprob_is_refused(tmp_path):
    core = make_core(make_config(tmp_path))
    result = roll_out(request_tasks(core)[0], 0)
    turn = result.rollouts[0].turns[0]
    turn.completion_logprobs, turn.completion_mask = [-0.5, math.nan, -0.5], [True, False, True]
    refused = core.on_result(result)
    assert not refused.accepted and "completion_logprobs must be finite, got [nan]" in refused.reason


def test_a_result_with_more_rollouts_than_asked_or_from_a_future_policy_is_refused(tmp_path):
    core = make_core(make_config(tmp_path))
    tasks = request_tasks(core)
    flood = roll_out(tasks[0], 0, rewards=[0.0, 1.0] * 50)
    refused = core.on_result(flood)
    assert not refused.accepted and "holds 100 rollouts, the task asked for 2" in refused.reason
    future = roll_out(tasks[1], policy_step=10**9)
    refused = core.on_result(future)
    assert not refused.accepted and "policy_step 1000000000 is outside 0..1" in refused.reason
    wrong_kind = roll_out(request_tasks(core)[0], 0)  # one of the two fresh draws
    wrong_kind.is_eval = True
    refused = core.on_result(wrong_kind)
    assert not refused.accepted and "(eval True), the task for" in refused.reason


def test_everything_accepted_replays_after_a_restart(tmp_path):
    """What passes the boundary check is journaled; a restart replays it without error."""
    from rlbus.services.orchestrator.journal import Journal

    config = make_config(tmp_path, max_steps=3)
    journal = Journal(tmp_path / "journal.jsonl")
    journal.open()
    core = make_core(config)
    core.journal = journal
    tasks = request_tasks(core)
    hostile = roll_out(tasks[0], 0)
    hostile.rollouts[0].metrics = {"x": float("nan")}
    assert not core.on_result(hostile).accepted
    good = roll_out(tasks[1], 0)
    good.rollouts[0].metrics = {"x": 1e300}
    assert core.on_result(good).accepted
    journal.close()
    replay = Journal(tmp_path / "journal.jsonl").replay(0)
    assert [r.task_id for r in replay.results] == [tasks[1].task_id]
