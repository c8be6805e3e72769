"""Run verifiers 0.4 (``verifiers.v1``) environments in an env-worker, unchanged.

``[[orchestrator.train.env]] id = "verifiers:<taskset-id>"`` builds the v1
``EnvConfig`` ``{"taskset": {"id": <taskset-id>}, **args}`` (``args`` may set
``id`` to pair a reusable env, ``taskset`` knobs, ``player``/``agent`` seats,
...; rlbus configs hold scalar args only, so a dotted key such as
``"player.harness.id" = "null"`` stands for the nested table) and
``verifiers.v1.load_environment`` makes the ``Env``: its taskset, its
harness's own loop and stop conditions, its judges. rlbus only replaces the
model: every call of the episode goes through :mod:`.verifiers_client`,
sampling token-in/token-out on rlbus inference.

Examples are the taskset's first ``num_examples`` tasks (an rlbus-side arg;
all of a bounded taskset by default, 1000 of an infinite one). The interception
is forced to one in-process ``server`` (no tunnel), whose model client is the
rlbus client; that server is started on the first task and lives as long as the
worker. Rewards: every judge score and metric of the episode's traces is a
metric, the weighted rewards add up to the reward and make the breakdown.
A harness that rewrote its history (summarised, forked, started a sub-agent) produced several
token branches: each becomes a token sequence of the rollout, trained as a sample of its own
(``rl``; other modes error such a rollout, as they do one whose episode failed, with the reason).

With ``server_address`` among the args the episodes run on a verifiers env server instead
(:mod:`.verifiers_serve`); both build rollouts from episodes with :func:`episode_rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from typing import Any

import msgspec

from rlbus.environments import SERVER_ADDRESS_ARG, Environment, Rubric
from rlbus.messages import Rollout, RolloutTask, Turn
from rlbus.services.env_worker.rollout import Sampler, Transcript, answer_text, failed_rollout, num_completion_tokens
from rlbus.services.env_worker.tokens import TurnRenderer
from rlbus.services.env_worker.verifiers_client import Branch, RolloutTokens, TokenSampler, rlbus_client_class

INFINITE_TASKSET_EXAMPLES = 1000
# A base URL that is never contacted: the rlbus client replaces the provider.
UNUSED_BASE_URL = "http://127.0.0.1:9/v1"


def load_v1_environment(env_id: str, args: dict[str, Any]) -> Environment:
    import verifiers.v1 as vf
    from verifiers.v1.configs.agent import agent_config_fields

    args = nested_args(args)
    if SERVER_ADDRESS_ARG in args:
        from rlbus.services.env_worker.verifiers_serve import load_served_environment

        return load_served_environment(env_id, args)
    num_examples = args.pop("num_examples", None)
    data = {**args, "taskset": {"id": env_id, **(args.get("taskset") or {})}, "interception": {"type": "server"}}
    config = vf.resolve_env_config(data)
    # A seat left on verifiers' default runtime (Prime's hosted sandboxes: an account and the
    # network) runs its harness as a local subprocess instead; a runtime named in args is kept.
    local = {name: {**(args.get(name) or {}), "runtime": {"type": "subprocess"}}
             for name, seat in agent_config_fields(config).items()
             if isinstance(seat.runtime, vf.PrimeConfig) and "runtime" not in (args.get(name) or {})}  # fmt: skip
    if local:
        config = vf.resolve_env_config({**data, **local})
    return VerifiersV1Environment(vf.load_environment(config), num_examples)


def nested_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with dotted keys as nested tables: ``{"taskset.game": "Hangman-v0"}`` ->
    ``{"taskset": {"game": "Hangman-v0"}}``; tables given as dicts merge with them."""
    nested: dict[str, Any] = {}
    for key, value in args.items():
        first, *rest = key.split(".")
        if isinstance(value, dict):
            value = nested_args(value)
        for name in reversed(rest):
            value = {name: value}
        _merge(nested, {first: value}, key)
    return nested


def _merge(into: dict[str, Any], table: dict[str, Any], key: str) -> None:
    for name, value in table.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value, key)
        elif name in into:
            raise ValueError(f"verifiers arg {key!r} sets {name!r}, which other args set already")
        else:
            into[name] = value


class VerifiersV1Environment(Environment):
    """An rlbus environment wrapping a verifiers v1 ``Env``; the Env runs its own episodes."""

    runs_own_loop = True
    keeps_transcripts = True
    """:class:`~.rollout.RolloutRunner` passes its ``transcripts`` to :meth:`run_group` when it keeps them."""

    def __init__(self, vf_env: Any, num_examples: int | None = None) -> None:
        self.tasks = first_tasks(vf_env.taskset, num_examples)
        super().__init__([example_of(task.data) for task in self.tasks], Rubric([]))
        self.vf_env = vf_env
        self._serving: contextlib.AsyncExitStack | None = None
        self._tokens: TokenSampler | None = None
        # Groups start concurrently: the first one starts serving, the others wait for its client.
        self._starting = asyncio.Lock()

    async def run_group(self, task: RolloutTask, sampler: Sampler, renderer: TurnRenderer, timeout_s: float,
                        transcripts: dict[str, Transcript] | None = None) -> list[Rollout]:  # fmt: skip
        tokens = await self._start(sampler, renderer)
        keys = rollout_keys(task)
        for index, key in enumerate(keys):
            tokens.begin(key, task, index)
        try:
            slots = self.vf_env.slots(self.tasks[task.example_id], task.num_rollouts)
            episodes = await asyncio.wait_for(
                asyncio.gather(*(self.vf_env.run_slot(slot, self._context(key, task)) for slot, key in zip(slots, keys))),
                timeout_s,
            )  # fmt: skip
        finally:
            records = [tokens.finish(key) for key in keys]
        rollouts = [episode_rollout(task, i, ep, record) for i, (ep, record) in enumerate(zip(episodes, records))]
        keep_transcripts(transcripts, rollouts, records)
        return rollouts

    async def _start(self, sampler: Sampler, renderer: TurnRenderer) -> TokenSampler:
        """Enter the Env's serving resources once, with the rlbus client as its model client."""
        async with self._starting:
            if self._tokens is None:
                await self._serve(sampler, renderer)
        assert self._tokens is not None
        return self._tokens

    async def _serve(self, sampler: Sampler, renderer: TurnRenderer) -> None:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.vf_env.serving())
        tokens = TokenSampler(sampler, renderer)
        client = rlbus_client_class()(tokens)
        # The interception server builds clients from configs (eval or train); rlbus hands it its own.
        self.vf_env._interception._client = lambda config: client
        self._serving, self._tokens = stack, tokens

    async def close(self) -> None:
        if self._serving is not None:
            await self._serving.aclose()
            self._serving, self._tokens = None, None

    def _context(self, key: str, task: RolloutTask) -> Any:
        """The episode's ``ModelContext``: the model name routes its calls to rollout ``key``."""
        import verifiers.v1 as vf

        # A train config: the interception then asks the client for whole responses, never a relayed stream.
        client = vf.TrainClientConfig(base_url=UNUSED_BASE_URL, api_key_var="RLBUS_UNUSED_API_KEY")
        sampling = vf.Sampling(temperature=task.sampling.temperature, max_tokens=task.sampling.max_tokens)
        return vf.ModelContext(model=key, client=client, sampling=sampling)


def rollout_keys(task: RolloutTask) -> list[str]:
    """The model name of each rollout's calls: how the rlbus client finds the rollout a call belongs to."""
    return [f"rlbus/{task.task_id}/{i}" for i in range(task.num_rollouts)]


def first_tasks(taskset: Any, num_examples: int | None) -> list[Any]:
    """The taskset's first ``num_examples`` tasks: all of a bounded one by default, 1000 of an infinite one."""
    if num_examples is None and not taskset.bounded:
        num_examples = INFINITE_TASKSET_EXAMPLES
    tasks = list(itertools.islice(iter(taskset), num_examples))
    if not tasks:
        raise ValueError(f"verifiers taskset {taskset.config.id!r} yielded no tasks")
    return tasks


def episode_rollout(task: RolloutTask, index: int, episode: Any, record: RolloutTokens) -> Rollout:
    """Rollout ``index`` of ``task`` from its finished episode (a v1 ``Episode``, or the ``WireEpisode``
    an env server sends) and the token branches its model calls sampled; errored when it cannot train."""
    reason = _failure(episode, record)
    if reason is not None:
        rollout = failed_rollout(task, index, reason)
        rollout.metrics = {"num_branches": float(len(record.branches))}
        return rollout
    turns = branch_turns(record.branches)
    reward, breakdown, metrics = _scores(episode)
    metrics |= {"num_turns": float(len(turns)), "num_completion_tokens": float(num_completion_tokens(turns)),
                "num_branches": float(len(record.branches))}  # fmt: skip
    truncated = any(trace.is_truncated for trace in episode.traces) or turns[-1].finish_reason == "length"
    data = episode.task.data
    return Rollout(
        rollout_id=f"{task.task_id}/{index}", turns=turns, reward=reward, reward_breakdown=breakdown,
        metrics=metrics, is_truncated=truncated, prompt_text=_text(getattr(data, "prompt", None)),
        completion_text="\n\n".join(trace.transcript for trace in episode.traces),
        answer=answer_text(getattr(data, "answer", None)),
    )  # fmt: skip


def keep_transcripts(transcripts: dict[str, Transcript] | None, rollouts: list[Rollout],
                     records: list[RolloutTokens]) -> None:  # fmt: skip
    """Put the conversation of each rollout that did not error into ``transcripts`` (when kept); a rollout
    of several branches is no one conversation, so it has none."""
    if transcripts is None:
        return
    for rollout, record in zip(rollouts, records, strict=True):
        if rollout.error is None and record.transcript is not None and len(record.branches) == 1:
            transcripts[rollout.rollout_id] = record.transcript


def branch_turns(branches: list[Branch]) -> list[Turn]:
    """The turns of every branch in order, each branch a token sequence of its own (``starts_sequence``).

    A fork shares its first turns with the branch it left: those turns come again as the start of the
    fork's sequence (its context) but untrained, so no sampled token is trained twice."""
    turns: list[Turn] = []
    seen: set[int] = set()
    for number, branch in enumerate(branches):
        for position, turn in enumerate(branch.turns):
            shared = id(turn) in seen
            seen.add(id(turn))
            starts = number > 0 and position == 0
            if shared or starts:
                mask = [False] * len(turn.completion_mask) if shared else list(turn.completion_mask)
                turn = msgspec.structs.replace(turn, completion_mask=mask, starts_sequence=starts)
            turns.append(turn)
    return turns


def _failure(episode: Any, record: RolloutTokens) -> str | None:
    """Why a finished episode cannot be trained on; None when it can."""
    errors = [*episode.errors, *(error for trace in episode.traces for error in trace.errors)]
    if errors:
        return f"verifiers episode failed: {errors[-1].type}: {errors[-1].message}"[:2000]
    if not record.branches:
        return "verifiers episode made no model call"
    if len(record.branches) > 1 and record.task.training_mode != "rl":
        # Each branch trains as a sequence of its own in rl; a teacher scores or answers one sequence.
        return (
            f"the harness rewrote its message history ({len(record.branches)} token branches: summarisation, "
            f"a sub-agent, edited or forked messages); training_mode = {record.task.training_mode!r} trains one "
            "token sequence per rollout (rl trains one per branch)"
        )
    return None


def _scores(episode: Any) -> tuple[float, dict[str, float], dict[str, float]]:
    """Reward, breakdown (weighted judge scores) and metrics (every judge score and metric)."""
    reward, breakdown, metrics = 0.0, {}, {}
    for trace in episode.traces:
        for name, value in trace.rewards.items():
            if value is None or not math.isfinite(value.score):
                continue
            metrics[name] = metrics.get(name, 0.0) + value.score
            if value.weight:
                breakdown[name] = breakdown.get(name, 0.0) + value.score
                reward += value.value
        for name, number in trace.metrics.items():
            if number is not None and math.isfinite(number):
                metrics[name] = float(number)
    return reward, breakdown, metrics


def example_of(data: Any) -> dict[str, Any]:
    """A task's wire data as an rlbus example (``prompt``, ``answer``, ``info`` when it has them)."""
    return data.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


def _text(prompt: Any) -> str:
    if prompt is None or isinstance(prompt, str):
        return prompt or ""
    return "\n\n".join(f"[{m.role}] {m.content}" for m in prompt)
