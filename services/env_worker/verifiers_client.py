"""A verifiers 0.4 (``verifiers.v1``) ``Client`` that samples token-in/token-out on rlbus inference.

Every model call of a v1 environment reaches :meth:`get_response` through the
environment's interception server, with the request ``body`` and ``turn``, the
graph-resolved prompt prefix. Each rollout keeps its token sequences here,
keyed by the model name the env-worker gave the rollout (``body["model"]``):

- a request whose prefix ends at a turn this client sampled, with only tool,
  user or system messages after it, extends that sequence: only the new
  messages are rendered, as a chat-template segment appended to the exact
  tokens sampled before (:class:`~rlbus.services.env_worker.tokens.TurnRenderer`);
- any other request (the first one, or a harness that summarised, edited or
  forked its history, or started a sub-agent) starts a new sequence, a branch,
  from a full rendering of its messages.

Each branch becomes a token sequence of the rollout (:func:`~.verifiers_v1.branch_turns`), trained
as a sample of its own. Sampling uses the
task's ``SamplingParams`` (the harness's own sampling knobs are not applied),
with exact token ids, logprobs and the policy step of every turn.

verifiers is an optional dependency, so the class is built on first use.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

from rlbus.environments import parse_hermes_tool_calls
from rlbus.messages import RolloutTask, Turn
from rlbus.services.env_worker.inference import Completion, InferenceError
from rlbus.services.env_worker.rollout import Sampler, Transcript, check_continuity, turn_of, turn_seed
from rlbus.services.env_worker.tokens import TemplateError, TurnRenderer

# Roles a harness may add after the model's turn and still extend the same token sequence.
APPENDABLE_ROLES = frozenset({"user", "tool", "system"})


@dataclass
class Branch:
    """One token sequence of a rollout: the turns sampled along one path of its message graph."""

    turns: list[Turn] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    """Every token so far: prompt segments and completions, in order."""
    max_model_len: int | None = None


@dataclass
class RolloutTokens:
    """The token branches of one rollout (one episode) and what it needs to sample."""

    task: RolloutTask
    index: int
    branches: list[Branch] = field(default_factory=list)
    ends: dict[tuple[int, ...], tuple[Branch, int]] = field(default_factory=dict)
    """Each sampled turn's full token sequence -> its branch and how many turns it had then,
    so a request whose resolved prefix ends at that turn finds where to continue."""
    overlong: bool = False
    """A request's prompt left no room to sample (the context is full)."""
    transcript: Transcript | None = None
    """The latest call's messages and the reply sampled for them: on a rollout of one branch, its whole
    conversation as the model saw it (``rlbus synthesize`` writes it)."""

    @property
    def num_turns(self) -> int:
        return sum(len(branch.turns) for branch in self.branches)


class TokenSampler:
    """The rlbus side of the v1 client: render, sample, keep branches; no verifiers types."""

    def __init__(self, sampler: Sampler, renderer: TurnRenderer) -> None:
        self.sampler, self.renderer = sampler, renderer
        self.rollouts: dict[str, RolloutTokens] = {}

    def begin(self, key: str, task: RolloutTask, index: int) -> None:
        self.rollouts[key] = RolloutTokens(task, index)

    def finish(self, key: str) -> RolloutTokens:
        return self.rollouts.pop(key)

    async def sample(self, key: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     previous: list[int] | None, tail_start: int) -> tuple[Completion, list[int]]:  # fmt: skip
        """Sample the next assistant turn of rollout ``key``; returns the completion and the full prompt.

        ``previous`` is the token sequence the resolved prefix ends with (a sampled turn's
        prompt and completion), ``tail_start`` the index of the first message after it.
        """
        rollout = self.rollouts.get(key)
        if rollout is None:
            raise KeyError(f"no rlbus rollout is registered for model {key!r}")
        branch, new_ids = await self._branch_and_segment(rollout, messages, tools, previous, tail_start)
        context = branch.context + new_ids
        task = rollout.task
        max_tokens = task.sampling.max_tokens
        if branch.max_model_len is not None:
            max_tokens = min(max_tokens, branch.max_model_len - len(context))
        if max_tokens < 1:
            rollout.overlong = True
            raise InferenceError(f"a prompt of {len(context)} tokens fills max_model_len={branch.max_model_len}")
        seed = turn_seed(task, rollout.index, rollout.num_turns)
        completion = await self.sampler.complete(context, task.sampling, max_tokens, seed)
        check_continuity(completion, context)
        if not any(b is branch for b in rollout.branches):
            rollout.branches.append(branch)
        branch.turns.append(turn_of(completion, new_ids))
        branch.context = context + completion.token_ids
        rollout.ends[tuple(branch.context)] = (branch, len(branch.turns))
        rollout.transcript = Transcript([*messages, reply_message(completion, bool(tools))], list(tools))
        return completion, context

    async def _branch_and_segment(self, rollout: RolloutTokens, messages: list[dict[str, Any]],
                                  tools: list[dict[str, Any]], previous: list[int] | None,
                                  tail_start: int) -> tuple[Branch, list[int]]:  # fmt: skip
        """The branch this request continues and the tokens to append; a new branch when none."""
        tail = messages[tail_start:]
        found = rollout.ends.get(tuple(previous)) if previous else None
        appendable = bool(tail) and all(m.get("role") in APPENDABLE_ROLES for m in tail)
        if found is None or not appendable or messages[tail_start - 1].get("role") != "assistant":
            tokenized = await self.renderer.prompt(messages, tools)
            return Branch(max_model_len=tokenized.max_model_len), tokenized.ids
        branch, num_turns = found
        new_ids = await self.renderer.continuation(messages[tail_start - 1], tail, tools,
                                                   branch.turns[num_turns - 1].completion_ids)  # fmt: skip
        if num_turns == len(branch.turns):
            return branch, new_ids
        # That turn was continued already: the paths fork here, and each is a branch of its own.
        context = list(branch.context[: len(previous or [])])
        return Branch(branch.turns[:num_turns], context, branch.max_model_len), new_ids


def assistant_reply(completion: Completion, has_tools: bool) -> tuple[str, list[dict[str, Any]], str]:
    """The sampled turn as a chat reply: content, OpenAI tool calls (Hermes ``<tool_call>`` blocks, when
    the request offered tools) and the finish reason (``length``, ``tool_calls`` or ``stop``)."""
    content, calls = parse_hermes_tool_calls(completion.text) if has_tools else (completion.text, [])
    finish = "length" if completion.finish_reason == "length" else ("tool_calls" if calls else "stop")
    return content, calls, finish


def reply_message(completion: Completion, has_tools: bool) -> dict[str, Any]:
    """The sampled turn as the assistant message the harness receives (tool calls included)."""
    content, calls, _ = assistant_reply(completion, has_tools)
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


@functools.cache
def rlbus_client_class() -> type:
    """:class:`RlbusClient`'s class, defined on first use: its base comes from verifiers 0.4."""
    from verifiers.v1.clients import Client
    from verifiers.v1.clients.train import serialize_completion, tool_to_wire
    from verifiers.v1.dialects import ChatDialect
    from verifiers.v1.dialects.chat import message_to_wire
    from verifiers.v1.errors import ProviderError
    from verifiers.v1.types import AssistantMessage, Response, ToolCall, TurnTokens, Usage

    class RlbusClient(Client):
        """A verifiers v1 ``Client`` sampling through an rlbus :class:`TokenSampler`."""

        def __init__(self, tokens: TokenSampler) -> None:
            self.tokens = tokens

        async def get_response(self, dialect: Any, body: dict, sampling: Any, session_id: str | None = None,
                               turn: Any = None, headers: Any = None) -> Any:  # fmt: skip
            if not isinstance(dialect, ChatDialect):
                raise ProviderError(f"rlbus samples chat-completions requests only, not {type(dialect).__name__}",
                                    status_code=400)  # fmt: skip
            if turn is not None:
                prompt, tools, tail_start = turn.prompt, turn.tools, turn.tail_start
                previous = turn.previous_renderer_token_ids()
            else:
                request = dialect.parse_request(body)
                prompt, tools, tail_start, previous = request.messages, request.tools, 0, None
            messages = [message_to_wire(m) for m in prompt]
            wire_tools = [tool_to_wire(t) for t in tools or []]
            try:
                previous_ids = None if previous is None else previous[0] + previous[1]
                completion, context = await self.tokens.sample(body["model"], messages, wire_tools, previous_ids,
                                                               tail_start)  # fmt: skip
            except (InferenceError, TemplateError) as exc:
                # 400: a full context or an unrenderable template will not get better on a retry.
                raise ProviderError(str(exc), status_code=400) from exc
            content, calls, finish = assistant_reply(completion, bool(wire_tools))
            tool_calls = [ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                          for c in calls]  # fmt: skip
            response = Response(
                id=f"rlbus-{time.monotonic_ns()}", created=int(time.time()), model=body["model"],
                message=AssistantMessage(content=content, tool_calls=tool_calls or None), finish_reason=finish,
                usage=Usage(prompt_tokens=len(context), completion_tokens=len(completion.token_ids)),
                tokens=TurnTokens(prompt_ids=context, completion_ids=completion.token_ids,
                                  completion_logprobs=completion.logprobs),
            )  # fmt: skip
            # The harness program reads an OpenAI chat.completion: there is no provider answer to relay.
            response.raw = serialize_completion(response, body["model"])
            return response

    return RlbusClient
