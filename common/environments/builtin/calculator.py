"""``calculator``: a tool-use task. The model calls a calculator, then answers.

Each example is a product or sum of multi-digit numbers that a small model
should not do in its head. The model may call ``calculate(expression)`` (in
the OpenAI tool-calling format) as often as it likes within ``max_turns``
turns; the reward is 1 when its final ``<answer>`` is the exact value.
``num_tool_calls`` and ``used_calculator`` are reported as metrics.
"""

from __future__ import annotations

import random

from rlbus.environments.base import RolloutState, Rubric
from rlbus.environments.builtin.arithmetic import correct_answer, random_expression, safe_eval
from rlbus.environments.tools import ToolEnvironment

SYSTEM_PROMPT = (
    "Solve the problem. Use the calculate tool for arithmetic, then give only the final integer "
    "inside <answer></answer> tags."
)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Returns the value as text.
    """
    return str(safe_eval(expression))


def used_calculator(state: RolloutState) -> float:
    return float(state.metrics.get("num_tool_calls", 0) > 0)


def make_examples(num_examples: int, seed: int, max_value: int) -> list[dict]:
    if num_examples < 1 or max_value < 10:
        raise ValueError(f"need num_examples >= 1 and max_value >= 10, got {num_examples}, {max_value}")
    rng = random.Random(f"calculator:{seed}")
    examples = []
    for _ in range(num_examples):
        expression = random_expression(rng, rng.randint(2, 3), max_value, ops="+*")
        examples.append({"prompt": f"What is {expression}?", "answer": str(safe_eval(expression))})
    return examples


def load_environment(
    num_examples: int = 1000, seed: int = 0, max_value: int = 999, max_turns: int = 4
) -> ToolEnvironment:
    """Calculator problems with numbers up to ``max_value``, generated from ``seed``."""
    rubric = Rubric([correct_answer, used_calculator], [1.0, 0.0])
    return ToolEnvironment(
        make_examples(num_examples, seed, max_value), rubric, [calculate], system_prompt=SYSTEM_PROMPT,
        max_turns=max_turns,
    )  # fmt: skip
