"""The env-worker's side of the teacher modes (``RolloutTask.training_mode``; docs/training.md).

- ``opd``: the policy samples as in ``rl``; then the teacher scores each rollout, its whole token
  sequence sent once as the prompt of a ``/v1/completions`` request with ``prompt_logprobs``
  (``rlbus.teacher``), and each turn gets ``teacher_logprobs``. Scoring here, after sampling and
  before the result is sent, makes the teacher's numbers part of the result: the orchestrator
  journals them with it before acknowledging, so a restarted orchestrator rebuilds the same batches
  without asking the teacher again, and a result is scored exactly once per time it is sampled.
- ``sft``: the teacher answers every model turn through ``/v1/chat/completions`` (any
  OpenAI-compatible server). Its text becomes tokens with the student's chat template
  (:meth:`TurnRenderer.assistant_ids`, through the student's ``/tokenize``): what the student
  would have sampled to say the same text. Multi-turn environments work as in ``rl``; the
  turn's logprobs are 0 (the SFT loss does not read them) and its policy step 0.

A teacher that fails (after its retries) errors the rollout, as a failing inference does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec

from rlbus.environments import Environment, RolloutState
from rlbus.messages import Rollout, RolloutTask
from rlbus.services.env_worker.inference import Completion, InferenceClient, InferenceError
from rlbus.services.env_worker.rollout import FirstTurn, RolloutRunner, failed_rollout
from rlbus.services.env_worker.tokens import TemplateError, TokenizedChat, TurnRenderer
from rlbus.teacher import TeacherClientConfig, TeacherError, prompt_token_logprobs, scoring_body


class TeacherClient:
    """Scoring and chat sampling against the teacher, with the inference client's retries and limits."""

    def __init__(self, config: TeacherClientConfig) -> None:
        self.config = config
        self.http = InferenceClient([config.base_url], api_key=config.api_key,
                                    max_concurrent_requests=config.max_concurrent_requests,
                                    request_timeout_s=config.request_timeout_s, max_retries=config.max_retries,
                                    model=config.model)  # fmt: skip

    async def close(self) -> None:
        await self.http.close()

    async def token_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """[N] the teacher's logprob of each token given the ones before it (None at position 0)."""
        response, replica = await self.http.post("/completions", scoring_body(self.config.model, token_ids))
        return prompt_token_logprobs(json_of(response), token_ids, replica.url + "/completions")

    async def score(self, rollout: Rollout) -> Rollout:
        """``rollout`` with ``teacher_logprobs`` on every turn."""
        ids = [token for turn in rollout.turns for token in turn.prompt_ids + turn.completion_ids]
        logprobs = await self.token_logprobs(ids) if any(t.completion_ids for t in rollout.turns) else []
        turns, offset = [], 0
        for turn in rollout.turns:
            start = offset + len(turn.prompt_ids)
            offset = start + len(turn.completion_ids)
            # The very first token has no context (never trained: the orchestrator masks it).
            scored = [0.0 if lp is None else lp for lp in logprobs[start:offset]]
            turns.append(msgspec.structs.replace(turn, teacher_logprobs=scored))
        return msgspec.structs.replace(rollout, turns=turns)

    async def score_group(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Every sound rollout scored; one the teacher cannot score comes back errored."""
        return list(await asyncio.gather(*(self._score_or_fail(r) for r in rollouts)))

    async def _score_or_fail(self, rollout: Rollout) -> Rollout:
        if rollout.error is not None or not rollout.turns:
            return rollout
        try:
            return await self.score(rollout)
        except (InferenceError, TeacherError) as exc:
            return msgspec.structs.replace(rollout, error=f"the teacher could not score the rollout: {exc}")

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], task: RolloutTask,
                   max_tokens: int, seed: int | None) -> tuple[str, str]:  # fmt: skip
        """(text, finish reason) of the teacher's answer to ``messages``."""
        sampling = task.sampling
        body: dict[str, Any] = {"model": self.config.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p}  # fmt: skip
        for key, value in (("tools", tools), ("stop", sampling.stop), ("seed", seed)):
            if value:
                body[key] = value
        response, replica = await self.http.post("/chat/completions", body)
        return chat_answer(json_of(response), replica.url + "/chat/completions")


def json_of(response: httpx.Response) -> Any:
    """The answer's JSON; None when it is not JSON (the parsers then say what is missing)."""
    try:
        return response.json()
    except ValueError:
        return None


def chat_answer(data: Any, url: str) -> tuple[str, str]:
    """(content, finish reason) of the first choice of a ``/v1/chat/completions`` answer."""
    try:
        choice = data["choices"][0]
        content, finish_reason = choice["message"].get("content") or "", choice.get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError, AttributeError):
        raise InferenceError(f"{url}: no choices[0].message in the answer: {str(data)[:300]}") from None
    if not isinstance(content, str):
        raise InferenceError(f"{url}: choices[0].message.content is {type(content).__name__}, not text")
    return content, finish_reason


class TeacherRolloutRunner(RolloutRunner):
    """Runs ``sft`` tasks: the teacher answers each model turn; the student's template makes it tokens."""

    def __init__(self, teacher: TeacherClient, renderer: TurnRenderer, env_timeout_s: float) -> None:
        super().__init__(teacher.http, renderer, env_timeout_s)
        self.teacher = teacher

    async def _first_turn(self, task: RolloutTask, env: Environment, prompt: TokenizedChat) -> FirstTurn | None:
        return None  # each rollout asks the teacher for its own first turn (sample_turn)

    async def run_foreign_task(self, task: RolloutTask, env: Any) -> list[Rollout]:
        reason = f"environment {task.env_id!r} runs its own loop: SFT from a teacher runs built-in environments only"
        return [failed_rollout(task, i, reason) for i in range(task.num_rollouts)]

    async def sample_turn(self, task: RolloutTask, state: RolloutState, context: list[int], max_tokens: int,
                          seed: int | None) -> Completion:  # fmt: skip
        text, finish_reason = await self.teacher.chat(state.messages, state.tools, task, max_tokens, seed)
        try:
            ids = await self.renderer.assistant_ids(text, state.tools, stopped=finish_reason == "stop")
        except TemplateError as exc:
            raise InferenceError(f"the teacher's answer cannot be rendered as the student's tokens: {exc}") from None
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), text=text, finish_reason=finish_reason,
                          policy_step=0)  # fmt: skip


class ModeRunner:
    """Runs each task as its ``training_mode`` says: the policy, the policy then the teacher's
    scores, or the teacher."""

    def __init__(self, runner: RolloutRunner, teacher: TeacherClient | None) -> None:
        self.runner, self.teacher = runner, teacher
        self.teacher_runner = None if teacher is None else TeacherRolloutRunner(
            teacher, runner.renderer, runner.env_timeout_s)  # fmt: skip

    async def run_task(self, task: RolloutTask, env: Environment) -> list[Rollout]:
        mode = task.training_mode
        if mode == "rl":
            return await self.runner.run_task(task, env)
        if self.teacher is None or self.teacher_runner is None:
            reason = (f"the task's training_mode is {mode!r}, which needs the teacher, but this env-worker has "
                      "no [env_worker.teacher] (rlbus rl copies [orchestrator.teacher.client] there)")  # fmt: skip
            return [failed_rollout(task, i, reason) for i in range(task.num_rollouts)]
        if mode == "sft":
            return await self.teacher_runner.run_task(task, env)
        return await self.teacher.score_group(await self.runner.run_task(task, env))
