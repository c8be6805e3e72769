"""Tool use in the OpenAI tool-calling format.

A :class:`ToolEnvironment` offers Python functions to the model as OpenAI tool
schemas (passed to the chat template, which renders them into the prompt),
parses the tool calls out of each completion, runs them and answers with
``tool`` messages. The rollout ends when the model answers without calling a
tool, or after ``max_turns`` model turns.

Models write tool calls in their own text format; the default parser reads
the Hermes/Qwen form the tiny model's template also uses::

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "2+2"}}
    </tool_call>

Pass another ``parse_tool_calls`` for a model with a different format.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from rlbus.environments.base import Environment, Message, RolloutState, Rubric

ToolCall = dict[str, Any]
"""``{"id": ..., "type": "function", "function": {"name": ..., "arguments": <JSON string>}}``."""

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool schema of ``func``: its name, first docstring paragraph and typed parameters."""
    properties, required = {}, []
    for param in inspect.signature(func, eval_str=True).parameters.values():
        json_type = _JSON_TYPES.get(param.annotation)
        if json_type is None:
            raise ValueError(
                f"tool {func.__name__}: parameter {param.name} needs a type annotation among "
                f"{[t.__name__ for t in _JSON_TYPES]}, got {param.annotation!r}"
            )
        properties[param.name] = {"type": json_type}
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    description = inspect.getdoc(func) or ""
    return {
        "type": "function",
        "function": {
            "name": func.__name__,
            "description": description.split("\n\n")[0].strip(),
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def parse_hermes_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split ``text`` into its prose and the tool calls of its ``<tool_call>`` blocks.

    A block that is not JSON with a string ``name`` is no call: it stays in the
    prose, so a malformed call ends the rollout like a final answer would.
    """
    calls, prose, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        call = _hermes_call(match.group(1), len(calls))
        if call is None:
            continue
        calls.append(call)
        prose.append(text[last : match.start()])
        last = match.end()
    prose.append(text[last:])
    return "".join(prose).strip(), calls


def _hermes_call(body: str, number: int) -> ToolCall | None:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", {})
    return {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": parsed["name"], "arguments": json.dumps(arguments)},
    }


class ToolEnvironment(Environment):
    """An environment whose model may call ``tools`` (plain Python functions) between turns.

    Tool functions take JSON-typed keyword arguments and return something
    ``str()`` can show; an exception becomes an error message the model reads.
    ``state.metrics`` counts ``num_tool_calls`` and ``num_tool_errors``.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        rubric: Rubric,
        tools: Sequence[Callable[..., Any]],
        *,
        system_prompt: str | None = None,
        max_turns: int = 4,
        parse_tool_calls: Callable[[str], tuple[str, list[ToolCall]]] = parse_hermes_tool_calls,
    ) -> None:
        self.tool_functions = {func.__name__: func for func in tools}
        super().__init__(
            examples, rubric, system_prompt=system_prompt, max_turns=max_turns, tools=[tool_schema(f) for f in tools]
        )
        self.parse_tool_calls = parse_tool_calls

    def parse_assistant(self, text: str) -> Message:
        content, calls = self.parse_tool_calls(text)
        message: Message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return message

    def env_response(self, state: RolloutState) -> list[Message] | None:
        calls = state.messages[-1].get("tool_calls") or []
        if not calls:
            return None  # the model answered without a tool: done
        replies = []
        for call in calls:
            replies.append({"role": "tool", "tool_call_id": call["id"], "content": self.run_tool(call, state)})
        return replies

    def run_tool(self, call: ToolCall, state: RolloutState) -> str:
        """The text answer to one call (errors are answers too, and counted)."""
        state.metrics["num_tool_calls"] = state.metrics.get("num_tool_calls", 0.0) + 1
        name = call["function"]["name"]
        try:
            arguments = json.loads(call["function"]["arguments"])
            func = self.tool_functions.get(name)
            if func is None:
                raise ValueError(f"unknown tool {name!r}; tools are {sorted(self.tool_functions)}")
            if not isinstance(arguments, dict):
                raise ValueError(f"arguments must be a JSON object, got {arguments!r:.80}")  # noqa: TRY004
            return str(func(**arguments))
        except Exception as exc:  # noqa: BLE001 - any tool failure is reported to the model
            state.metrics["num_tool_errors"] = state.metrics.get("num_tool_errors", 0.0) + 1
            return f"Error: {type(exc).__name__}: {exc}"
