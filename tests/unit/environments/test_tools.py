"""Tool use: schemas from functions, parsing tool calls, answering them."""

from __future__ import annotations

import json

import pytest

from rlbus.environments import RolloutState, Rubric, ToolEnvironment, parse_hermes_tool_calls, tool_schema


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    More words that are not part of the description.
    """
    return a + b


def fail(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(reason)


def test_tool_schema_follows_the_signature() -> None:
    assert tool_schema(add) == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a"],
            },
        },
    }


def test_tool_schema_needs_json_types() -> None:
    def untyped(x):
        return x

    with pytest.raises(ValueError, match="parameter x needs a type annotation"):
        tool_schema(untyped)


def test_hermes_calls_are_parsed_and_malformed_blocks_stay_prose() -> None:
    text = (
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        "<tool_call>not json</tool_call>\n"
        '<tool_call>{"name": "add", "arguments": {"a": 5}}</tool_call>'
    )
    prose, calls = parse_hermes_tool_calls(text)
    assert prose == "Let me add.\n\n<tool_call>not json</tool_call>"
    assert [c["function"]["name"] for c in calls] == ["add", "add"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}, {"a": 5}]
    assert [c["id"] for c in calls] == ["call_0", "call_1"]
    assert parse_hermes_tool_calls("no calls") == ("no calls", [])


def _env() -> ToolEnvironment:
    return ToolEnvironment([{"prompt": "1+2?", "answer": "3"}], Rubric([]), [add, fail])


def _state_after(env: ToolEnvironment, text: str) -> RolloutState:
    state = RolloutState(env.example(0), env.prompt_messages(env.example(0)), 1, tools=env.tools)
    state.messages.append(env.parse_assistant(text))
    state.completions.append(text)
    return state


def test_tool_environment_runs_calls_and_answers_with_tool_messages() -> None:
    env = _env()
    state = _state_after(env, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert state.messages[-1]["tool_calls"][0]["function"]["name"] == "add"
    assert env.env_response(state) == [{"role": "tool", "tool_call_id": "call_0", "content": "3"}]
    assert state.metrics == {"num_tool_calls": 1.0}


def test_tool_errors_are_answers_the_model_reads() -> None:
    env = _env()
    state = _state_after(env, (
        '<tool_call>{"name": "fail", "arguments": {"reason": "boom"}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"c": 1}}</tool_call>'
    ))  # fmt: skip
    replies = [m["content"] for m in env.env_response(state)]
    assert replies[0] == "Error: RuntimeError: boom"
    assert "unknown tool 'nope'; tools are ['add', 'fail']" in replies[1]
    assert replies[2].startswith("Error: TypeError")
    assert state.metrics == {"num_tool_calls": 3.0, "num_tool_errors": 3.0}


def test_an_answer_without_tool_calls_ends_the_rollout() -> None:
    env = _env()
    assert env.env_response(_state_after(env, "<answer>3</answer>")) is None
