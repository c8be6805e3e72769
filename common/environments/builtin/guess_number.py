"""``guess-number``: a multi-turn game with feedback from the environment.

The environment thinks of an integer in ``[low, high]``; the model guesses
inside ``<guess>`` tags and hears "Higher." or "Lower." until it is right or
``max_turns`` guesses are used. Rewards: ``solved`` (weight 1) and
``turns_left`` (weight 0.5), the fraction of turns still unused when solved,
so fewer guesses score more.
"""

from __future__ import annotations

import random
import re

from rlbus.environments.base import Environment, Message, RolloutState, Rubric

_GUESS = re.compile(r"<guess>\s*(-?\d+)\s*</guess>")


def parse_guess(text: str) -> int | None:
    found = _GUESS.findall(text)
    return int(found[-1]) if found else None


def guesses(messages: list[Message]) -> list[int | None]:
    """The guess of every assistant turn (None where there was no valid one)."""
    return [parse_guess(m.get("content") or "") for m in messages if m["role"] == "assistant"]


def solved(messages: list[Message], answer: int) -> float:
    return float(answer in guesses(messages))


def turns_left(messages: list[Message], answer: int, info: dict) -> float:
    """1 for a first-guess hit, falling linearly to 1/max_turns for a last-turn hit; 0 if unsolved."""
    made = guesses(messages)
    if answer not in made:
        return 0.0
    return (info["max_turns"] - made.index(answer)) / info["max_turns"]


class GuessNumberEnvironment(Environment):
    """Answers each guess with "Higher.", "Lower." or a reminder of the format."""

    def env_response(self, state: RolloutState) -> list[Message] | None:
        guess = parse_guess(state.last_completion)
        if guess == state.answer:
            return None
        if guess is None:
            reply = "Answer with one integer inside <guess></guess> tags."
        else:
            reply = "Higher." if guess < state.answer else "Lower."
        return [{"role": "user", "content": reply}]


def load_environment(
    num_examples: int = 1000, seed: int = 0, low: int = 1, high: int = 100, max_turns: int = 7
) -> GuessNumberEnvironment:
    """Secret numbers in ``[low, high]`` drawn from ``seed``."""
    if num_examples < 1 or low > high or max_turns < 1:
        raise ValueError(
            f"need num_examples >= 1, low <= high, max_turns >= 1; got {num_examples}, {low}, {high}, {max_turns}"
        )
    rng = random.Random(f"guess-number:{seed}")
    prompt = (
        f"I am thinking of an integer between {low} and {high}. Guess it: answer with one integer inside "
        f"<guess></guess> tags. After each guess I say Higher or Lower. You have {max_turns} guesses."
    )
    info = {"low": low, "high": high, "max_turns": max_turns}
    examples = [{"prompt": prompt, "answer": rng.randint(low, high), "info": info} for _ in range(num_examples)]
    return GuessNumberEnvironment(examples, Rubric([solved, turns_left], [1.0, 0.5]), max_turns=max_turns)
