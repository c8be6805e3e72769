"""Run environments written for the ``verifiers`` library (0.3.x, classic API) in an env-worker.

Install with the ``verifiers`` extra and name the environment ``verifiers:<id>``
in ``[[orchestrator.train.env]]``: ``verifiers.load_environment(<id>, **args)``
imports the module ``<id>`` (dashes become underscores) and calls its
``load_environment``. The environment keeps its own rollout loop, stop
conditions, ``env_response``, parsers and rubric (group rewards included);
only the model calls are replaced by :class:`TokenClient`, a ``verifiers``
``Client`` that samples token-in/token-out through the env-worker's inference
client: turn 0 renders the prompt, later turns append only the messages that
verifiers added since the model's last turn.

Examples are the rows of the environment's training dataset (its eval
dataset when it has no training set). ``env_timeout_s`` bounds the whole group,
generation included, since verifiers interleaves both.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from rlbus.environments import SERVER_ADDRESS_ARG, Environment, Message, Rubric, parse_hermes_tool_calls
from rlbus.messages import Rollout, RolloutTask, Turn
from rlbus.services.env_worker.inference import InferenceError
from rlbus.services.env_worker.rollout import (
    Sampler,
    answer_text,
    check_continuity,
    failed_rollout,
    turn_of,
    turn_seed,
)
from rlbus.services.env_worker.tokens import TurnRenderer


def load_verifiers_environment(env_id: str, args: dict[str, Any]) -> Environment:
    try:
        import verifiers
    except ImportError:
        raise ValueError(
            f"environment 'verifiers:{env_id}' needs the verifiers library: pip install 'rlbus[verifiers]'"
        ) from None
    if not hasattr(verifiers, "load_environment"):  # 0.4 and later: only the v1 API
        from rlbus.services.env_worker.verifiers_v1 import load_v1_environment

        return load_v1_environment(env_id, args)
    if SERVER_ADDRESS_ARG in args:
        raise ValueError(f"environment 'verifiers:{env_id}': env servers (server_address) need verifiers 0.4, "
                         f"not {getattr(verifiers, '__version__', 'this older one')}")  # fmt: skip
    return VerifiersEnvironment(verifiers.load_environment(env_id, **args))


@dataclass
class Conversation:
    """Token bookkeeping of one verifiers rollout."""

    context: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    num_messages: int = 0
    """Messages the context holds: the last prompt plus the model's reply."""
    last_assistant: Message | None = None
    max_model_len: int | None = None


class VerifiersEnvironment(Environment):
    """An rlbus environment wrapping a verifiers ``Environment``; it runs its own loop."""

    runs_own_loop = True

    def __init__(self, vf_env: Any) -> None:
        dataset = vf_env.build_dataset() if vf_env.dataset_source is not None else vf_env.build_eval_dataset()
        super().__init__([dict(row) for row in dataset], Rubric([]))
        self.vf_env = vf_env

    async def run_group(self, task: RolloutTask, sampler: Sampler, renderer: TurnRenderer,
                        timeout_s: float) -> list[Rollout]:  # fmt: skip
        client = token_client_class()(sampler, renderer, task)
        example = self.example(task.example_id)
        inputs = [dict(example) for _ in range(task.num_rollouts)]
        outputs = await asyncio.wait_for(
            self.vf_env.run_group(inputs, client, "policy", {}, state_columns=["trajectory_id"]), timeout_s
        )
        return [
            self._rollout(task, i, out, client.conversations.get(out["trajectory_id"])) for i, out in enumerate(outputs)
        ]

    def _rollout(self, task: RolloutTask, index: int, output: Any, conversation: Conversation | None) -> Rollout:
        error = output.get("error")
        if conversation is None or not conversation.turns:
            return failed_rollout(task, index, f"verifiers rollout made no model turn: {error or 'no error given'}")
        weights = dict(zip(_reward_names(self.vf_env.rubric), _reward_weights(self.vf_env.rubric), strict=False))
        metrics = {k: float(v) for k, v in (output.get("metrics") or {}).items() if isinstance(v, int | float)}
        return Rollout(
            rollout_id=f"{task.task_id}/{index}", turns=conversation.turns, reward=float(output.get("reward") or 0.0),
            reward_breakdown={k: v for k, v in metrics.items() if weights.get(k)},
            metrics={**metrics, "num_turns": float(len(conversation.turns))},
            is_truncated=bool(output.get("is_truncated")), error=None if error is None else str(error),
            prompt_text=_text(output.get("prompt")), completion_text=_text(output.get("completion")),
            answer=answer_text(output.get("answer")),
        )  # fmt: skip


# The rubric's function names and weights are private in 0.3.x; without them the breakdown stays empty.
def _reward_names(rubric: Any) -> list[str]:
    names = getattr(rubric, "_get_reward_func_names", None)
    return list(names()) if names else []


def _reward_weights(rubric: Any) -> list[float]:
    weights = getattr(rubric, "_get_reward_weights", None)
    return list(weights()) if weights else []


def _text(messages: Any) -> str:
    if not isinstance(messages, list):
        return str(messages or "")
    return "\n\n".join(f"[{_field(m, 'role')}] {_field(m, 'content') or ''}" for m in messages)


def _field(message: Any, name: str) -> Any:
    return message.get(name) if isinstance(message, dict) else getattr(message, name, None)


def _as_dict(message: Any) -> Message:
    """A verifiers message (pydantic or dict) as an OpenAI chat message."""
    data = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
    data = {k: v for k, v in data.items() if v is not None}
    if data.get("tool_calls"):
        data["tool_calls"] = [_openai_call(c) for c in data["tool_calls"]]
    return data


def _openai_call(call: Any) -> dict[str, Any]:
    call = call if isinstance(call, dict) else call.model_dump()
    if "function" in call:
        return call
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _openai_tool(tool: Any) -> dict[str, Any]:
    data = tool if isinstance(tool, dict) else tool.model_dump(exclude_none=True)
    if data.get("type") == "function":
        return data
    function = {k: data[k] for k in ("name", "description", "parameters") if k in data}
    return {"type": "function", "function": function}


@functools.cache
def token_client_class() -> type:
    """:class:`TokenClient`'s class, defined on first use: its base comes from verifiers, an optional dependency."""
    from verifiers.clients import Client

    class TokenClient(Client):
        """A verifiers ``Client`` that samples token-in/token-out through the env-worker's inference client."""

        def __init__(self, sampler: Sampler, renderer: TurnRenderer, task: RolloutTask) -> None:
            super().__init__(None)
            self.sampler, self.renderer, self.task = sampler, renderer, task
            self.conversations: dict[str, Conversation] = {}

        async def get_response(self, prompt: Any, model: str, sampling_args: Any, tools: Any = None,
                               **kwargs: Any) -> Any:  # fmt: skip
            return await _get_response(self, prompt, model, tools, kwargs["state"])

        # The request/response conversion steps of other clients are not used: get_response does it all.
        def setup_client(self, config: Any) -> Any:
            return None

        async def to_native_tool(self, tool: Any) -> Any:
            return _openai_tool(tool)

        async def to_native_prompt(self, messages: Any) -> tuple[Any, dict]:
            return [_as_dict(m) for m in messages], {}

        async def get_native_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("TokenClient.get_response samples by itself")

        async def raise_from_native_response(self, response: Any) -> None:
            return None

        async def from_native_response(self, response: Any) -> Any:
            return response

        async def close(self) -> None:
            return None

    return TokenClient


async def _get_response(client: Any, prompt: Any, model: str, tools: Any, state: Any) -> Any:
    import verifiers as vf
    from verifiers.types import Response, ResponseMessage, ResponseTokens, ToolCall

    conversation = client.conversations.setdefault(state["trajectory_id"], Conversation())
    messages = [_as_dict(m) for m in prompt]
    openai_tools = [_openai_tool(t) for t in tools or []]
    task: RolloutTask = client.task
    try:
        if not conversation.turns:
            tokenized = await client.renderer.prompt(messages, openai_tools)
            new_ids, conversation.max_model_len = tokenized.ids, tokenized.max_model_len
        else:
            new_ids = await client.renderer.continuation(conversation.last_assistant, messages[conversation.num_messages :],
                                                         openai_tools, conversation.turns[-1].completion_ids)  # fmt: skip
        context = conversation.context + new_ids
        max_tokens = task.sampling.max_tokens
        if conversation.max_model_len is not None:
            max_tokens = min(max_tokens, conversation.max_model_len - len(context))
        if max_tokens < 1:
            raise vf.OverlongPromptError(f"a prompt of {len(context)} tokens fills max_model_len")
        index = list(client.conversations).index(state["trajectory_id"])
        seed = turn_seed(task, index, len(conversation.turns))
        completion = await client.sampler.complete(context, task.sampling, max_tokens, seed)
        check_continuity(completion, context)
    except (InferenceError, ValueError) as exc:
        raise vf.ModelError(str(exc)) from exc
    conversation.turns.append(turn_of(completion, new_ids))
    conversation.context = context + completion.token_ids
    content, calls = parse_hermes_tool_calls(completion.text) if openai_tools else (completion.text, [])
    conversation.last_assistant = {"role": "assistant", "content": content}
    if calls:
        conversation.last_assistant["tool_calls"] = calls
    conversation.num_messages = len(messages) + 1
    truncated = completion.finish_reason == "length"
    n = len(completion.token_ids)
    return Response(
        id=f"{task.task_id}-{time.monotonic_ns()}", created=int(time.time()), model=model,
        message=ResponseMessage(
            content=content,
            tool_calls=[ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                        for c in calls] or None,
            finish_reason="length" if truncated else ("tool_calls" if calls else "stop"), is_truncated=truncated,
            tokens=ResponseTokens(prompt_ids=context, prompt_mask=[0] * len(context), completion_ids=completion.token_ids,
                                  completion_mask=[1] * n, completion_logprobs=completion.logprobs),
        ),
    )  # fmt: skip
