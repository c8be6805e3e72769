"""``arithmetic``: small integer expressions, exact-match reward on the final answer.

The model answers inside ``<answer>`` tags; the reward is 1 when the tagged
answer is exactly the value (as an integer), else 0. ``has_answer_tag`` is a
metric (weight 0). Expressions use ``+``, ``-`` and ``*`` on integers from 0
to ``max_value``; :func:`safe_eval` (also the calculator tool) computes them.
"""

from __future__ import annotations

import ast
import operator
import random
import re

from rlbus.environments.base import Environment, Rubric

SYSTEM_PROMPT = "Compute the value of the expression. Give only the final integer inside <answer></answer> tags."
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 16
MAX_MAGNITUDE = 10**30


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses).

    Nothing else is evaluated: names, calls and attributes raise ValueError,
    as do huge exponents or results (so a model cannot stall the worker).
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r:.80} ({exc.msg})") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError(f"result larger than {MAX_MAGNITUDE:.0e}")
        return value
    raise ValueError(f"unsupported element {type(node).__name__} in the expression")


def random_expression(rng: random.Random, num_operands: int, max_value: int, ops: str = "+-*") -> str:
    terms = [str(rng.randint(0, max_value))]
    for _ in range(num_operands - 1):
        terms += [rng.choice(ops), str(rng.randint(0, max_value))]
    return " ".join(terms)


def parse_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>`` tags, stripped; None without them."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def correct_answer(completion: str, answer: str) -> float:
    """1 when the tagged answer is exactly the integer ``answer``."""
    parsed = parse_answer(completion)
    return float(parsed is not None and parsed.lstrip("+") == answer)


def has_answer_tag(completion: str) -> float:
    return float(parse_answer(completion) is not None)


def make_examples(num_examples: int, seed: int, max_operands: int, max_value: int) -> list[dict]:
    if num_examples < 1 or max_operands < 2 or max_value < 1:
        raise ValueError(
            f"need num_examples >= 1, max_operands >= 2, max_value >= 1; got {num_examples}, {max_operands}, {max_value}"
        )
    rng = random.Random(f"arithmetic:{seed}")
    examples = []
    for _ in range(num_examples):
        expression = random_expression(rng, rng.randint(2, max_operands), max_value)
        examples.append({"prompt": f"{expression} = ?", "answer": str(safe_eval(expression))})
    return examples


def load_environment(
    num_examples: int = 1000, seed: int = 0, max_operands: int = 3, max_value: int = 20
) -> Environment:
    """Expressions of 2 to ``max_operands`` integers in ``[0, max_value]``, generated from ``seed``."""
    examples = make_examples(num_examples, seed, max_operands, max_value)
    return Environment(examples, Rubric([correct_answer, has_answer_tag], [1.0, 0.0]), system_prompt=SYSTEM_PROMPT)
