"""The environment API: what a user writes to add a task to rlbus.

An :class:`Environment` holds a list of examples (local data, generated or read
from a file: nothing is fetched from a hub), turns an example into chat
messages, optionally answers the model between turns, and scores the finished
conversation with a :class:`Rubric` of weighted reward functions. The env-worker
runs the loop (see ``services/env_worker/rollout.py``)::

    messages = env.prompt_messages(example)          # turn 0
    for turn in range(env.max_turns):
        assistant = env.parse_assistant(<sampled text>)
        reply = env.env_response(state)                # None or [] ends the rollout
    reward = env.rubric(state)

Hooks may be plain or ``async`` functions; plain ones run in a worker thread so
a slow environment never stalls the worker, and every hook shares the
rollout's ``env_timeout_s`` budget. Messages use the OpenAI chat format,
tool calls included. The full guide is ``docs/environments.md``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlbus.jsonl import read_json_objects

Message = dict[str, Any]
"""One chat message in the OpenAI format: ``{"role": ..., "content": ...}`` (plus ``tool_calls``)."""
RewardFunc = Callable[..., float | Awaitable[float]]

# The keyword arguments a reward function may declare; it receives only those it names.
REWARD_INPUTS = ("completion", "answer", "info", "prompt", "messages", "state")


@dataclass
class RolloutState:
    """Everything known about one rollout while it runs; hooks read and write it."""

    example: dict[str, Any]
    """The example being rolled out (``prompt``, ``answer``, ``info``)."""
    messages: list[Message]
    """The conversation so far: prompt messages, then assistant and environment turns."""
    num_prompt_messages: int
    """How many of ``messages`` are the prompt."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI tool schemas offered to the model (empty without tools)."""
    completions: list[str] = field(default_factory=list)
    """Exact sampled text of each model turn (messages may hold it parsed, e.g. into tool calls)."""
    turn: int = 0
    """Model turns completed so far."""
    data: dict[str, Any] = field(default_factory=dict)
    """Scratch space of the environment (game state, sandbox handles, ...)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra numbers to report with the rollout (e.g. ``num_tool_calls``)."""
    is_truncated: bool = False
    """True once a completion hit ``max_tokens`` or the context ran out."""

    @property
    def answer(self) -> Any:
        return self.example.get("answer")

    @property
    def info(self) -> dict[str, Any]:
        return self.example.get("info") or {}

    @property
    def prompt(self) -> list[Message]:
        return self.messages[: self.num_prompt_messages]

    @property
    def completion_messages(self) -> list[Message]:
        """Messages after the prompt: the model's turns and the environment's replies."""
        return self.messages[self.num_prompt_messages :]

    @property
    def last_completion(self) -> str:
        """Exact text of the model's latest turn ("" before the first)."""
        return self.completions[-1] if self.completions else ""


class Rubric:
    """Weighted reward functions; the reward is ``sum(weight * value)``.

    A reward function declares the inputs it needs by name, any of
    ``completion`` (text of the model's last turn), ``answer``, ``info``,
    ``prompt``, ``messages`` (the whole conversation) and ``state``, and
    returns a number. A function with weight 0 is a metric: reported in the
    breakdown, not rewarded.
    """

    def __init__(self, funcs: Sequence[RewardFunc], weights: Sequence[float] | None = None) -> None:
        weights = [1.0] * len(funcs) if weights is None else list(weights)
        if len(weights) != len(funcs):
            raise ValueError(f"a rubric needs one weight per function: {len(funcs)} functions, {len(weights)} weights")
        self.funcs = list(funcs)
        self.weights = [float(w) for w in weights]
        self.names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(self.funcs)]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward function names must be unique: {self.names}")
        for func in self.funcs:
            unknown = _named_params(func) - set(REWARD_INPUTS)
            if unknown:
                raise ValueError(
                    f"reward function {func.__name__} asks for {sorted(unknown)}; it may ask for {list(REWARD_INPUTS)}"
                )

    def inputs(self, func: RewardFunc, state: RolloutState) -> dict[str, Any]:
        """The keyword arguments ``func`` declared, taken from ``state``."""
        available = {
            "completion": state.last_completion,
            "answer": state.answer,
            "info": state.info,
            "prompt": state.prompt,
            "messages": state.messages,
            "state": state,
        }
        return {name: available[name] for name in _named_params(func)}

    def total(self, values: dict[str, float]) -> float:
        """The weighted reward from each function's (already checked) value."""
        return sum(weight * values[name] for name, weight in zip(self.names, self.weights, strict=True))


def checked_reward(name: str, value: Any) -> float:
    """``value`` as a float; ValueError if it is not a finite number (bools count as 0/1)."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or isinstance(value, complex):
        # ValueError, not TypeError: the runner reports every bad reward the same way.
        raise ValueError(f"reward function {name} returned {type(value).__name__} {value!r:.60}, not a number")  # noqa: TRY004
    if not math.isfinite(value):
        raise ValueError(f"reward function {name} returned {value}")
    return float(value)


class Environment:
    """A task the policy is trained or evaluated on.

    Subclass it and override the hooks you need, or build one directly for a
    single-turn task: ``Environment(examples, Rubric([my_reward]), system_prompt=...)``.
    Each example is a dict with ``prompt`` (a string, or a list of chat
    messages), optionally ``answer`` (whatever the reward functions compare
    against) and ``info`` (a dict of extra data). Examples must not depend on
    anything but the constructor's arguments: the orchestrator and every
    env-worker load the same environment and must agree on example ``i``.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        rubric: Rubric,
        *,
        system_prompt: str | None = None,
        max_turns: int = 1,
        tools: Sequence[dict[str, Any]] = (),
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.examples = list(examples)
        self.rubric = rubric
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.tools = list(tools)

    @property
    def num_examples(self) -> int:
        """How many examples there are; tasks name them by index ``[0, num_examples)``."""
        return len(self.examples)

    def example(self, index: int) -> dict[str, Any]:
        """Example ``index`` (a copy); IndexError names the valid range."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} does not exist; this environment has {self.num_examples}")
        return dict(self.examples[index])

    # ---------------------------------------------------------------- hooks

    def prompt_messages(self, example: dict[str, Any]) -> list[Message]:
        """The turn-0 conversation: the system prompt (if any), then the example's prompt."""
        prompt = example.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = [dict(m) for m in prompt]
        else:
            raise ValueError(f"an example's prompt must be a string or a list of chat messages, got {prompt!r:.80}")
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def setup(self, state: RolloutState) -> None | Awaitable[None]:
        """Called once before the first turn (e.g. to start a game in ``state.data``)."""
        return None

    def parse_assistant(self, text: str) -> Message:
        """The chat message for a sampled completion (tool environments parse tool calls here)."""
        return {"role": "assistant", "content": text}

    def env_response(self, state: RolloutState) -> list[Message] | None | Awaitable[list[Message] | None]:
        """Messages answering the model's latest turn (``user`` or ``tool`` roles).

        Called after every model turn except the last allowed one; returning
        None or ``[]`` ends the rollout. Single-turn environments keep this default.
        """
        return None


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Examples from a JSON-lines file, one object per line; ValueError names a bad line."""
    return read_json_objects(path, required_key="prompt")


def _named_params(func: Callable[..., Any]) -> set[str]:
    params = inspect.signature(func).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
