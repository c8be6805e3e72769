"""The env-worker's check of its own results: what the orchestrator would refuse goes out errored."""

from __future__ import annotations

from typing import Any

import pytest

from rlbus import codec
from rlbus.config.base import BusConfig
from rlbus.messages import Rollout, RolloutResult, Turn
from rlbus.services.env_worker.outgoing import MAX_ERROR_CHARS, checked_result

BUS = BusConfig()


def turn(**fields: Any) -> Turn:
    values = {"prompt_ids": [1, 2], "completion_ids": [3, 4], "completion_logprobs": [-0.5, -0.25],
              "completion_mask": [True, True], "policy_step": 0}  # fmt: skip
    return Turn(**{**values, **fields})


def rollout(index: int = 0, **fields: Any) -> Rollout:
    values = {"rollout_id": f"t/{index}", "turns": [turn()], "reward": 1.0, "reward_breakdown": {"ok": 1.0},
              "metrics": {"num_turns": 1.0}, "timing": {"total": 0.5}, "prompt_text": "p", "completion_text": "c"}  # fmt: skip
    return Rollout(**{**values, **fields})


def result(*rollouts: Rollout) -> RolloutResult:
    return RolloutResult(task_id="t", worker_id="w", env_id="e", example_id=0, rollouts=list(rollouts))


def test_a_sound_result_goes_out_unchanged() -> None:
    sound = result(rollout(0), rollout(1, error="env_response raised ValueError: boom", turns=[]))
    checked, num_replaced = checked_result(sound, 2, BUS)
    assert checked == sound and num_replaced == 0


@pytest.mark.parametrize(("fields", "problem"), [
    ({"reward": float("nan")}, "reward is nan, not a finite number of magnitude at most 1e+06"),
    ({"reward": 1e39}, "reward is 1e+39, not a finite number of magnitude at most 1e+06"),
    ({"reward_breakdown": {"ok": float("inf")}}, "reward_breakdown['ok'] is inf, not finite"),
    ({"metrics": {"num_turns": float("nan")}}, "metrics['num_turns'] is nan, not finite"),
    ({"timing": {"total": float("-inf")}}, "timing['total'] is -inf, not finite"),
    ({"turns": []}, "turns is empty"),
    ({"turns": [turn(prompt_ids=[-1, 2])]}, "turns[0].prompt_ids holds -1, outside the int32 token ids"),
    ({"turns": [turn(), turn(completion_ids=[3, 2**31])]}, "turns[1].completion_ids holds 2147483648, outside"),
    ({"turns": [turn(completion_logprobs=[-0.5])]},
     "turns[0].completion_ids, completion_logprobs, completion_mask have lengths (2, 1, 2)"),
    # An untrained (masked) token's logprob must be finite too: the orchestrator journals it.
    ({"turns": [turn(completion_logprobs=[-0.5, float("nan")], completion_mask=[True, False])]},
     "turns[0].completion_logprobs[1] is nan: logprobs must be finite, trained ones <= 0.001"),
    ({"turns": [turn(completion_logprobs=[0.5, -1.0])]}, "turns[0].completion_logprobs[0] is 0.5"),
    ({"turns": [turn(policy_step=-2)]}, "turns[0].policy_step is -2, negative"),
    ({"reward": "1.0"}, "Expected `float`, got `str` - at `$.rollouts[0].reward`"),
    ({"metrics": {"n": None}}, "Expected `float`, got `None` - at `$.rollouts[0].metrics[...]`"),
    ({"completion_text": "\ud800"}, "UnicodeEncodeError"),
    ({"turns": [turn(prompt_ids=[2**70])]}, "OverflowError"),
])  # fmt: skip
def test_each_bad_rollout_goes_out_errored_naming_the_field(fields: dict[str, Any], problem: str) -> None:
    checked, num_replaced = checked_result(result(rollout(0), rollout(1, **fields)), 2, BUS)
    good, bad = checked.rollouts
    assert good == rollout(0) and num_replaced == 1
    assert bad.error is not None and bad.error.startswith("invalid rollout, not sent: ") and problem in bad.error
    assert (bad.rollout_id, bad.reward, bad.turns, bad.prompt_text) == ("t/1", 0.0, [], "")
    # ... and the orchestrator decodes what goes out.
    assert codec.decode(codec.encode(checked), RolloutResult) == checked


def test_an_errored_rollout_with_bad_numbers_keeps_its_first_reason() -> None:
    bad = rollout(0, error="reward function x raised KeyError: 'y'", reward_breakdown={"x": float("nan")})
    (checked,) = checked_result(result(bad), 1, BUS)[0].rollouts
    assert checked.error == ("invalid rollout, not sent: reward_breakdown['x'] is nan, not finite "
                             "(it had errored: reward function x raised KeyError: 'y')")  # fmt: skip


def test_an_unencodable_error_text_is_escaped_and_a_long_one_cut() -> None:
    bad = rollout(0, error="\ud800" + "x" * 10_000, prompt_text="\ud800")
    (checked,) = checked_result(result(bad), 1, BUS)[0].rollouts
    assert checked.error is not None and len(checked.error) <= MAX_ERROR_CHARS and "\\ud800xxx" in checked.error
    assert codec.decode(codec.encode(result(checked)), RolloutResult).rollouts == [checked]


def test_the_wrong_number_of_rollouts_errors_the_whole_group() -> None:
    checked, num_replaced = checked_result(result(rollout(0)), 3, BUS)
    assert num_replaced == 3 and [r.rollout_id for r in checked.rollouts] == ["t/0", "t/1", "t/2"]
    assert {r.error for r in checked.rollouts} == {"the environment returned 1 rollouts for a task of 3"}


def test_rollouts_that_fit_alone_but_not_together_error_the_group() -> None:
    bus = BusConfig(max_header_bytes=1024)
    rollouts = [rollout(i, completion_text="y" * 400) for i in range(3)]
    checked, num_replaced = checked_result(result(*rollouts), 3, bus)
    assert num_replaced == 3
    assert all(r.error is not None and "the result cannot be sent: DecodeError: envelope and body of" in r.error
               for r in checked.rollouts)  # fmt: skip
    codec.decode(codec.encode(checked), RolloutResult, max_header_bytes=1024)
