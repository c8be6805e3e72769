"""first-letter: one letter and nothing else scores, splits never overlap, the teacher errs as documented."""

from __future__ import annotations

import pytest

from rlbus.environments.base import RolloutState
from rlbus.environments.builtin import first_letter as env
from rlbus.environments.registry import load_environment


def state(truncated: bool = False) -> RolloutState:
    return RolloutState(example={}, messages=[], num_prompt_messages=0, is_truncated=truncated)


@pytest.mark.parametrize(("completion", "reward"), [
    ("k", 1.0),
    (" k\n", 1.0),
    ("k<|im_end|>", 1.0),
    ("t", 0.0),                      # the last letter: the teacher's mistake
    ("kk", 0.0),                     # went on after the answer
    ("k t", 0.0),
    ("K", 0.0),                      # the word is lower case, so is its first letter
    ("The first letter is k", 0.0),
    ("", 0.0),
])  # fmt: skip
def test_only_exactly_the_first_letter_scores(completion, reward):
    assert env.correct(completion, "k", state()) == reward


def test_a_truncated_completion_scores_zero_and_the_last_letter_is_counted_apart():
    assert env.correct("k", "k", state(truncated=True)) == 0.0
    assert env.is_last_letter("t", {"word": "kqzt"}, state()) == 1.0
    assert env.is_last_letter("k", {"word": "kqzt"}, state()) == 0.0
    assert env.is_last_letter("a", {"word": "aba"}, state()) == 0.0  # first and last alike: not a mistake
    assert env.is_last_letter("t", {"word": "kqzt"}, state(truncated=True)) == 0.0


def test_train_and_eval_splits_never_share_a_word():
    train = set(env.make_words(3000, 0, 3, 6, "train"))
    held_out = set(env.make_words(600, 7, 3, 6, "eval"))
    assert train and held_out and not train & held_out
    assert all(3 <= len(w) <= 6 and w.isalpha() and w.islower() for w in held_out)


def test_the_teachers_demonstrations_are_right_forty_percent_of_the_time():
    rows = env.generate_sft(2000, seed=0)
    first = last = 0
    for row in rows:
        word, answer = row["prompt"][-1]["content"], row["completion"][0]["content"]
        assert not env.is_eval_word(word) and answer in (word[0], word[-1])
        first += answer == word[0]
        last += answer == word[-1] and word[0] != word[-1]
    # 40% first, plus the last-letter answers of words that begin and end alike (~1 in 26).
    assert 0.37 < first / len(rows) < 0.48 and 0.52 < last / len(rows) < 0.63


def test_loaded_through_the_registry_with_its_split_and_bad_args_refused():
    eval_env = load_environment("first-letter", {"split": "eval", "num_examples": 20, "seed": 3})
    example = eval_env.example(0)
    assert example["answer"] == example["prompt"][0] and env.is_eval_word(example["prompt"])
    assert load_environment("first-letter", {"system_prompt": True}).system_prompt == env.SYSTEM_PROMPT
    with pytest.raises(ValueError, match="split must be"):
        load_environment("first-letter", {"split": "test"})
    with pytest.raises(ValueError, match="min_length"):
        load_environment("first-letter", {"min_length": 1})
