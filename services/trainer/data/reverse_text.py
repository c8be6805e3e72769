"""A synthetic reverse-text SFT set: the reverse-text environment's task, with answers.

The examples come from the environment itself (``common/environments/builtin/reverse_text.py``):
same word list, same system prompt, same ``<reversed_text>`` tags, so a model
warmed up here meets exactly the prompts it is later rewarded on. The SFT set
uses its own seed (``seed + SEED_OFFSET``) so it does not repeat the RL examples
of the same run seed. ``rlbus sft --data.synthetic reverse-text`` trains on it.
"""

from __future__ import annotations

from typing import Any

from rlbus.environments.builtin.reverse_text import SYSTEM_PROMPT, make_examples, parse_reversed_text

OPEN_TAG, CLOSE_TAG = "<reversed_text>", "</reversed_text>"
SEED_OFFSET = 1_000_003

__all__ = ["SYSTEM_PROMPT", "format_answer", "generate", "make_example", "parse_reversed_text"]


def format_answer(text: str) -> str:
    """The completion the environment rewards fully: the reversed text inside the tags."""
    return f"{OPEN_TAG}\n{text[::-1]}\n{CLOSE_TAG}"


def make_example(text: str) -> dict[str, Any]:
    """One SFT example in conversational prompt-completion form, prompted as the environment prompts."""
    return {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        "completion": [{"role": "assistant", "content": format_answer(text)}],
    }


def generate(num_examples: int, seed: int = 0, min_words: int = 1, max_words: int = 4) -> list[dict[str, Any]]:
    """``num_examples`` examples, the same for the same seed."""
    texts = [e["info"]["text"] for e in make_examples(num_examples, seed + SEED_OFFSET, min_words, max_words)]
    return [make_example(text) for text in texts]
