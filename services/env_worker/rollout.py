"""Run the rollouts of one task: the turn loop, token bookkeeping, scoring, failures.

:class:`RolloutRunner` is the domain logic of the env-worker, without sockets:
given a ``RolloutTask`` and its environment it returns ``num_rollouts`` scored
``Rollout`` messages. It talks to inference through two small interfaces (a
sampler with ``complete`` and a :class:`TurnRenderer`), so tests can drive it
with the real client or a fake.

With ``transcripts`` set (``rlbus synthesize``), the runner also keeps the conversation of
every rollout that finished without error, as chat messages, by rollout id: the env-worker
leaves it None, since rollouts travel and train as tokens.

A rollout never raises: an environment hook that raises or outlives the
rollout's ``env_timeout_s`` budget, a reward that is not a finite number, or
inference failing after its retries gives a rollout with ``error`` set (not
trained on) and the worker goes on.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from rlbus.environments import Environment, Message, RolloutState, Rubric, checked_reward
from rlbus.messages import Rollout, RolloutTask, SamplingParams, Turn
from rlbus.services.env_worker.env_calls import EnvCaller, RolloutFailure, check_reply
from rlbus.services.env_worker.inference import Completion, InferenceError
from rlbus.services.env_worker.tokens import TemplateError, TokenizedChat, TurnRenderer


class Sampler(Protocol):
    async def complete(
        self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int, seed: int | None = None
    ) -> Completion: ...


async def sample_group(sampler: Sampler, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int,
                       n: int, seed: int | None) -> list[Completion]:  # fmt: skip
    """``n`` completions of one prompt: one request when the sampler offers ``complete_n`` (the
    inference client does), else ``n`` requests seeded ``seed + i``."""
    complete_n = getattr(sampler, "complete_n", None)
    if complete_n is not None:
        return list(await complete_n(prompt_ids, sampling, max_tokens, n, seed))
    seeds = [None if seed is None else seed + i for i in range(n)]
    return list(await asyncio.gather(*(sampler.complete(prompt_ids, sampling, max_tokens, s) for s in seeds)))


@dataclass
class FirstTurn:
    """A group's first turn, sampled in one request for all its rollouts."""

    completions: list[Completion]
    generate_s: float
    """Seconds the group waited for it (counted in each rollout's ``generate`` time)."""


@dataclass
class Transcript:
    """A finished rollout's conversation in the OpenAI chat format (what ``rlbus synthesize`` writes)."""

    messages: list[Message]
    """Prompt messages, then the model's turns and the environment's replies."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI tool schemas offered to the model (empty without tools)."""


@dataclass
class RolloutRecord:
    """What one rollout has produced so far."""

    turns: list[Turn] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "env": 0.0, "score": 0.0})


class RolloutRunner:
    """Turns a ``RolloutTask`` into its group of scored ``Rollout`` messages."""

    def __init__(self, sampler: Sampler, renderer: TurnRenderer, env_timeout_s: float,
                 model_endpoint_host: str | None = None, transcripts: dict[str, Transcript] | None = None,
                 ) -> None:  # fmt: skip
        self.sampler, self.renderer, self.env_timeout_s = sampler, renderer, env_timeout_s
        self.model_endpoint_host = model_endpoint_host
        """Where env servers reach this worker's model endpoint (``EnvWorkerConfig.model_endpoint_host``)."""
        self.transcripts = transcripts
        """Rollout id -> conversation of each rollout that finished without error; the caller takes them
        out. None keeps none. An environment that runs its own loop keeps them only when it says it
        can (``keeps_transcripts``)."""

    async def run_task(self, task: RolloutTask, env: Environment) -> list[Rollout]:
        """All ``task.num_rollouts`` rollouts, run concurrently; the prompt is rendered once for the group.

        Never raises (but for cancellation): whatever fails, the group comes back with ``error`` set.
        """
        try:
            if getattr(env, "runs_own_loop", False):  # e.g. a verifiers environment
                return await self.run_foreign_task(task, env)
            return await self._run_group(task, env)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one task, not the worker nor its credit
            logger.exception("task {} ({}) failed unexpectedly", task.task_id, task.env_id)
            return [failed_rollout(task, i, f"{type(exc).__name__}: {exc}") for i in range(task.num_rollouts)]

    async def _run_group(self, task: RolloutTask, env: Environment) -> list[Rollout]:
        # The example and its prompt are environment code too: off the loop, within the timeout
        # (a budget of their own, once per group; each rollout then gets a full budget).
        caller = EnvCaller(self.env_timeout_s)
        try:
            example = await caller("example", env.example, task.example_id)
            messages = await caller("prompt_messages", env.prompt_messages, example)
            prompt = await self.renderer.prompt(messages, env.tools)
        except RolloutFailure as exc:
            return self._failed_group(task, f"cannot build the prompt of example {task.example_id}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bad example or template fails the task, not the worker
            reason = f"cannot build the prompt of example {task.example_id}: {type(exc).__name__}: {exc}"
            return self._failed_group(task, reason)
        first = await self._first_turn(task, env, prompt)
        if isinstance(first, str):
            return self._failed_group(task, first, messages_text(messages))
        runs = (self.run_rollout(task, env, example, messages, prompt, i, first) for i in range(task.num_rollouts))
        return list(await asyncio.gather(*runs))

    def _failed_group(self, task: RolloutTask, reason: str, prompt_text: str = "") -> list[Rollout]:
        logger.warning("task {} ({}): {}", task.task_id, task.env_id, reason)
        return [failed_rollout(task, i, reason, prompt_text) for i in range(task.num_rollouts)]

    async def _first_turn(self, task: RolloutTask, env: Environment, prompt: TokenizedChat) -> FirstTurn | str | None:
        """Turn 0 of every rollout, sampled together; the reason when that fails; None when the
        rollouts sample turn 0 themselves (no turn, or a prompt that leaves no room: they say why)."""
        max_tokens = first_turn_max_tokens(task, prompt)
        if env.max_turns < 1 or max_tokens < 1:
            return None
        started = time.monotonic()
        try:
            completions = await sample_group(self.sampler, prompt.ids, task.sampling, max_tokens, task.num_rollouts,
                                             task.sampling.seed)  # fmt: skip
        except InferenceError as exc:
            return str(exc)
        return FirstTurn(completions, time.monotonic() - started)

    async def run_foreign_task(self, task: RolloutTask, env: Any) -> list[Rollout]:
        """The group of an environment that runs its own loop; any failure errors the whole group."""
        # An environment served by another process calls the model back through this worker.
        options: dict[str, Any] = {}
        if getattr(env, "calls_back", False):
            options["endpoint_host"] = self.model_endpoint_host
        if self.transcripts is not None and getattr(env, "keeps_transcripts", False):
            options["transcripts"] = self.transcripts
        try:
            return await env.run_group(task, self.sampler, self.renderer, self.env_timeout_s, **options)
        except TimeoutError:
            reason = f"environment timed out (env_timeout_s={self.env_timeout_s:g})"
        except Exception as exc:  # noqa: BLE001 - a failing environment fails its task, not the worker
            reason = f"{type(exc).__name__}: {exc}"
        logger.warning("task {} ({}) errored: {}", task.task_id, task.env_id, reason)
        return [failed_rollout(task, i, reason) for i in range(task.num_rollouts)]

    async def run_rollout(
        self, task: RolloutTask, env: Environment, example: dict[str, Any], messages: list[Message],
        prompt: TokenizedChat, index: int, first: FirstTurn | None = None,
    ) -> Rollout:  # fmt: skip
        state = RolloutState(example, [dict(m) for m in messages], len(messages))
        record, caller = RolloutRecord(), EnvCaller(self.env_timeout_s)
        started = time.monotonic()
        # Everything up to the finished message is guarded, texts included: an environment can break
        # them (a reply in the assistant's role, a message without one) after its hooks returned.
        try:
            state.tools = list(env.tools)
            await self._play(task, env, state, prompt, record, caller, index, first)
            score_started, env_used = time.monotonic(), caller.used_s
            reward, breakdown = await self._score(env, state, caller)
            record.timing["score"] = time.monotonic() - score_started
            record.timing["env"] += env_used
            metrics = rollout_metrics(state, record)
            prompt_text, text = messages_text(state.prompt), completion_text(state)
        except (RolloutFailure, InferenceError, TemplateError) as exc:
            return self._failed(task, index, str(exc), state, record, started)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one rollout, not the worker
            logger.exception("task {} rollout {} failed unexpectedly", task.task_id, index)
            return self._failed(task, index, f"{type(exc).__name__}: {exc}", state, record, started)
        record.timing["total"] = time.monotonic() - started
        if self.transcripts is not None:
            self.transcripts[f"{task.task_id}/{index}"] = Transcript([dict(m) for m in state.messages], state.tools)
        return Rollout(
            rollout_id=f"{task.task_id}/{index}", turns=record.turns, reward=reward, reward_breakdown=breakdown,
            metrics=metrics, is_truncated=state.is_truncated, prompt_text=prompt_text, completion_text=text,
            timing=record.timing, answer=answer_text(state.answer),
        )  # fmt: skip

    async def _play(
        self, task: RolloutTask, env: Environment, state: RolloutState, prompt: TokenizedChat,
        record: RolloutRecord, caller: EnvCaller, index: int, first: FirstTurn | None,
    ) -> None:  # fmt: skip
        """The turn loop: sample, let the environment answer, append only the new tokens."""
        if type(env).setup is not Environment.setup:  # skip the thread hop for the no-op default
            await caller("setup", env.setup, state)
        context, new_ids = list(prompt.ids), list(prompt.ids)
        while state.turn < env.max_turns:
            max_tokens = task.sampling.max_tokens
            if prompt.max_model_len is not None:
                max_tokens = min(max_tokens, prompt.max_model_len - len(context))
            if max_tokens < 1:
                if not record.turns:
                    raise RolloutFailure(
                        f"the prompt of {len(context)} tokens fills max_model_len={prompt.max_model_len}"
                    )
                state.is_truncated = True
                return
            if first is not None and state.turn == 0:
                completion = first.completions[index]
                record.timing["generate"] += first.generate_s
            else:
                generate_started = time.monotonic()
                seed = turn_seed(task, index, state.turn)
                completion = await self.sample_turn(task, state, context, max_tokens, seed)
                record.timing["generate"] += time.monotonic() - generate_started
            check_continuity(completion, context)
            record.turns.append(turn_of(completion, new_ids))
            context += completion.token_ids
            assistant = await caller("parse_assistant", env.parse_assistant, completion.text)
            state.messages.append(assistant)
            state.completions.append(completion.text)
            state.turn += 1
            # A turn cut off at max_tokens is closed by the next segment; the environment decides whether to go on.
            state.is_truncated |= completion.finish_reason == "length"
            if state.turn >= env.max_turns:
                return
            reply = check_reply(await caller("env_response", env.env_response, state))
            if not reply:
                return
            state.messages.extend(reply)
            new_ids = await self.renderer.continuation(assistant, reply, env.tools, completion.token_ids)
            context += new_ids

    async def sample_turn(self, task: RolloutTask, state: RolloutState, context: list[int], max_tokens: int,
                          seed: int | None) -> Completion:  # fmt: skip
        """The model's next turn: the policy continues the ``context`` tokens (a teacher overrides
        this, services/env_worker/teacher.py)."""
        return await self.sampler.complete(context, task.sampling, max_tokens, seed)

    async def _score(self, env: Environment, state: RolloutState, caller: EnvCaller) -> tuple[float, dict[str, float]]:
        rubric, values = env.rubric, {}
        for name, func in zip(rubric.names, rubric.funcs, strict=True):
            value = await caller(f"reward function {name}", func, **rubric.inputs(func, state))
            try:
                values[name] = checked_reward(name, value)
            except ValueError as exc:
                raise RolloutFailure(str(exc)) from None
        # A rubric's own ``total`` is environment code like any hook (the default one is plain arithmetic).
        if type(rubric).total is Rubric.total:
            total = rubric.total(values)
        else:
            total = await caller("the rubric's total", rubric.total, values)
        try:
            return checked_reward("total", total), values
        except ValueError:
            raise RolloutFailure(f"the weighted reward of {values} is {total!r:.60}, not a finite number") from None

    def _failed(
        self, task: RolloutTask, index: int, reason: str, state: RolloutState, record: RolloutRecord, started: float
    ) -> Rollout:
        logger.warning("task {} ({}) rollout {} errored: {}", task.task_id, task.env_id, index, reason)
        record.timing["total"] = time.monotonic() - started
        rollout = failed_rollout(task, index, reason)
        rollout.turns, rollout.timing = record.turns, record.timing
        try:
            rollout.prompt_text, rollout.completion_text = messages_text(state.prompt), completion_text(state)
        except Exception:  # noqa: BLE001 - the texts are for people; what broke them is likely the reason above
            logger.debug("task {} rollout {}: no texts for the errored rollout", task.task_id, index)
        return rollout


def failed_rollout(task: RolloutTask, index: int, reason: str, prompt_text: str = "") -> Rollout:
    return Rollout(rollout_id=f"{task.task_id}/{index}", turns=[], reward=0.0, error=reason, prompt_text=prompt_text)


def answer_text(answer: Any) -> str | None:
    """An example's reference answer as text for people; None when it has none (verifiers uses "")."""
    return None if answer is None or answer == "" else str(answer)


def turn_seed(task: RolloutTask, index: int, turn: int) -> int | None:
    """The sampling seed of rollout ``index``'s turn ``turn``; None for an unseeded task.

    Turn 0 gets ``seed + index``, what vLLM gives the ``index``-th sample of a seeded request for
    ``n`` samples; each later turn moves on by ``num_rollouts``, so no two requests of a task
    replay the same random stream.
    """
    if task.sampling.seed is None:
        return None
    return task.sampling.seed + turn * task.num_rollouts + index


def first_turn_max_tokens(task: RolloutTask, prompt: TokenizedChat) -> int:
    """Tokens turn 0 may sample: ``max_tokens``, less when the prompt nearly fills the context."""
    if prompt.max_model_len is None:
        return task.sampling.max_tokens
    return min(task.sampling.max_tokens, prompt.max_model_len - len(prompt.ids))


def turn_of(completion: Completion, prompt_ids: list[int]) -> Turn:
    return Turn(
        prompt_ids=list(prompt_ids),
        completion_ids=completion.token_ids,
        completion_logprobs=completion.logprobs,
        completion_mask=[True] * len(completion.token_ids),
        policy_step=completion.policy_step,
        finish_reason=completion.finish_reason,
    )


def check_continuity(completion: Completion, context: list[int]) -> None:
    """The server must have seen exactly our tokens (a proxy that re-tokenizes would break training)."""
    seen = completion.prompt_token_ids
    if seen is not None and seen != context:
        raise InferenceError(f"the server saw a prompt of {len(seen)} tokens, not the {len(context)} sent")


def rollout_metrics(state: RolloutState, record: RolloutRecord) -> dict[str, float]:
    """The environment's metrics plus turn and token counts; non-finite values are dropped."""
    metrics = {"num_turns": float(state.turn), "num_completion_tokens": float(num_completion_tokens(record.turns))}
    for name, value in state.metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RolloutFailure(f"metric {name} is {type(value).__name__} {value!r:.60}, not a number")
        if math.isfinite(value):
            metrics[name] = float(value)
    return metrics


def num_completion_tokens(turns: list[Turn]) -> int:
    return sum(len(turn.completion_ids) for turn in turns)


def messages_text(messages: list[Message]) -> str:
    """Messages for humans: a lone message as its text, several as ``[role] text`` blocks."""
    if len(messages) == 1:
        return messages[0].get("content") or ""
    return "\n\n".join(f"[{m['role']}] {m.get('content') or ''}" for m in messages)


def completion_text(state: RolloutState) -> str:
    """The sampled text of a single-turn rollout; the model's and environment's turns for multi-turn ones."""
    if len(state.completion_messages) == 1:
        return state.completions[0]
    blocks, turn = [], 0
    for message in state.completion_messages:
        text = message.get("content") or ""
        if message["role"] == "assistant":
            text, turn = state.completions[turn], turn + 1
        blocks.append(f"[{message['role']}] {text}")
    return "\n\n".join(blocks)
