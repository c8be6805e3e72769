"""larger-number: the reward reads one answer the completion ends with, splits never overlap."""

from __future__ import annotations

import pytest

from rlbus.environments.base import RolloutState
from rlbus.environments.builtin import larger_number as env
from rlbus.environments.registry import load_environment


def state(truncated: bool = False) -> RolloutState:
    return RolloutState(example={}, messages=[], num_prompt_messages=0, is_truncated=truncated)


@pytest.mark.parametrize(("completion", "reward"), [
    ("2", 1.0),
    ("  2\n", 1.0),
    ("2<|im_end|>", 1.0),
    ("1", 0.0),                      # the smaller one
    ("2 or 1", 0.0),                 # went on writing after the answer
    ("12", 0.0),                     # two answers: no picking the right one
    ("The second: 2", 0.0),          # the answer and nothing else
    ("<answer>2</answer>", 0.0),
    ("", 0.0),
])  # fmt: skip
def test_only_exactly_the_larger_numbers_position_scores(completion, reward):
    assert env.correct(completion, "2", state()) == reward


def test_a_truncated_completion_scores_zero_even_with_the_right_answer():
    assert env.correct("2", "2", state(truncated=True)) == 0.0
    assert env.has_answer("2", state(truncated=True)) == 0.0
    assert env.has_answer("1", state()) == 1.0 and env.has_answer("3", state()) == 0.0


def test_train_and_eval_splits_never_share_a_pair():
    train = {frozenset(p) for p in env.make_pairs(3000, 0, 10, 99, "train")}
    held_out = {frozenset(p) for p in env.make_pairs(600, 7, 10, 99, "eval")}
    assert train and held_out and not train & held_out
    assert all(a != b for a, b in env.make_pairs(100, 1, 10, 99, "eval"))


def test_sft_demonstrations_have_the_format_but_pick_at_random():
    rows = env.generate_sft(400, seed=0)
    picks = []
    for row in rows:
        a, b = map(int, row["prompt"][-1]["content"].split())
        answer = env.parse_answer(row["completion"][0]["content"])
        assert answer in (1, 2) and not env.is_eval_pair(a, b)
        picks.append(answer == (1 if a > b else 2))
    assert 0.4 < sum(picks) / len(picks) < 0.6  # right about half the time: the data does not know


def test_loaded_through_the_registry_with_its_split():
    eval_env = load_environment("larger-number", {"split": "eval", "num_examples": 20, "seed": 3})
    assert eval_env.system_prompt is None
    assert load_environment("larger-number", {"system_prompt": True}).system_prompt == env.SYSTEM_PROMPT
    example = eval_env.example(0)
    a, b = map(int, example["prompt"].split())
    assert example["answer"] == ("1" if a > b else "2") and env.is_eval_pair(a, b)
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        load_environment("larger-number", {"split": "test"})
