"""Run ``rlbus synthesize``: plan the rollouts not written yet, roll them out, write their rows.

Each example is one task of ``rollouts_per_example`` rollouts, run by the env-worker's
:class:`~rlbus.services.env_worker.rollout.RolloutRunner` (the same prompts, turn loop,
tool parsing and scoring as training) with at most ``max_concurrent`` tasks at once;
its rollouts' conversations come from the runner's ``transcripts``. Rows are written
as each task finishes (:mod:`.dataset`), so a run stopped at any point loses at most
the tasks in flight. Errored rollouts are counted, reported and not written: the next
run tries them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from tqdm import tqdm

from rlbus.environments import Environment, EnvironmentCache
from rlbus.errors import UserError
from rlbus.messages import Rollout, RolloutTask, SamplingParams
from rlbus.services.env_worker.inference import InferenceClient
from rlbus.services.env_worker.rollout import RolloutRunner, Transcript
from rlbus.services.env_worker.tokens import TurnRenderer
from rlbus.services.orchestrator.config import EnvSource
from rlbus.services.synthesize.config import SynthesizeConfig
from rlbus.services.synthesize.dataset import Dataset, RowOrigin, build_row
from rlbus.services.synthesize.endpoint import check_endpoint

SUMMARY = (
    "Roll out the [[env]] environments against a model endpoint (--client.base-url, a vLLM server) and write\n"
    "the rollouts as an SFT dataset that `rlbus sft` reads (--output, JSON lines); a rerun continues where a\n"
    "stopped one ended. Environment variables are not read: name the API key's with --client.api-key-var."
)


@dataclass
class Group:
    """One example's rollouts, those of them not written yet."""

    env_index: int
    spec: EnvSource
    env: Environment
    example_id: int
    pending: list[int]
    """Rollout indices with no row yet."""


@dataclass
class Tally:
    """What this run did, for the progress bar and the summary."""

    accepted: int = 0
    rejected: int = 0
    errored: int = 0
    reward_sum: float = 0.0
    errors: list[str] = field(default_factory=list)
    """The first few reasons, for the summary."""

    @property
    def written(self) -> int:
        return self.accepted + self.rejected

    def postfix(self) -> dict[str, Any]:
        mean = self.reward_sum / self.written if self.written else 0.0
        return {"kept": self.accepted, "rejected": self.rejected, "errored": self.errored, "reward": f"{mean:.3f}"}


def group_seed(seed: int, spec: EnvSource, example_id: int) -> int:
    """The sampling seed of an example's task: a rerun samples a redone example as the first run did."""
    text = f"{seed}|{spec.id}|{sorted(spec.args.items())}|{example_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 2  # room for + turn * n + index


def origin(config: SynthesizeConfig, spec: EnvSource, example_id: int, index: int, model: str) -> RowOrigin:
    return RowOrigin(spec.id, dict(spec.args), example_id, index, config.seed, model)


def plan(config: SynthesizeConfig, envs: list[Environment], dataset: Dataset, model: str) -> list[Group]:
    """Every example with a rollout not written yet, environment by environment (``envs`` as ``config.env``)."""
    groups = []
    for env_index, (spec, env) in enumerate(zip(config.env, envs, strict=True)):
        count = env.num_examples if config.num_examples is None else min(config.num_examples, env.num_examples)
        if config.num_examples is not None and config.num_examples > env.num_examples:
            logger.warning("{} has {} examples, fewer than num_examples = {}: rolling out all of them",
                           spec.id, env.num_examples, config.num_examples)  # fmt: skip
        for example_id in range(count):
            pending = [i for i in range(config.rollouts_per_example)
                       if not dataset.is_done(origin(config, spec, example_id, i, model).key)]  # fmt: skip
            if pending:
                groups.append(Group(env_index, spec, env, example_id, pending))
    return groups


async def load(environments: EnvironmentCache, env_index: int, spec: EnvSource) -> Environment:
    """The environment of ``env[env_index]``; UserError when it cannot be loaded or cannot give conversations."""
    try:
        env = await environments.get(spec.id, spec.loader_args)
    except UserError:
        raise
    except Exception as exc:  # any loader failure comes from the user's environment or its args
        raise UserError(f"env[{env_index}] {spec.id!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if getattr(env, "runs_own_loop", False) and not getattr(env, "keeps_transcripts", False):
        raise UserError(f"env[{env_index}] {spec.id!r} runs its own rollout loop and does not hand its "
                        "conversations back (verifiers 0.3 environments): use verifiers 0.4")  # fmt: skip
    return env


class Synthesizer:
    """Rolls out planned groups with a :class:`RolloutRunner` and writes their rows."""

    def __init__(self, config: SynthesizeConfig, runner: RolloutRunner, dataset: Dataset, model: str) -> None:
        self.config, self.runner, self.dataset, self.model = config, runner, dataset, model
        assert runner.transcripts is not None, "the runner must keep transcripts"
        self.transcripts: dict[str, Transcript] = runner.transcripts
        self.tally = Tally()

    async def run(self, groups: list[Group], bar: tqdm) -> Tally:
        queue: Iterator[Group] = iter(groups)

        async def work() -> None:
            for group in queue:  # one shared iterator: each group goes to one worker
                self.record(group, await self.runner.run_task(self.task(group), group.env))
                bar.update(len(group.pending))
                bar.set_postfix(self.tally.postfix(), refresh=False)

        await asyncio.gather(*(work() for _ in range(min(self.config.max_concurrent, len(groups)))))
        return self.tally

    def task(self, group: Group) -> RolloutTask:
        sampling = self.config.sampling
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                seed=group_seed(self.config.seed, group.spec, group.example_id))  # fmt: skip
        return RolloutTask(task_id=f"synthesize-{group.env_index}-{group.example_id}", env_id=group.spec.id,
                           env_args=group.spec.loader_args, example_id=group.example_id,
                           num_rollouts=self.config.rollouts_per_example, sampling=params, lease_s=0.0,
                           issued_at=0.0)  # fmt: skip

    def record(self, group: Group, rollouts: Sequence[Rollout]) -> None:
        """Write the rows of the group's pending rollouts; count the errored ones."""
        transcripts = [self.transcripts.pop(rollout.rollout_id, None) for rollout in rollouts]
        for index in group.pending:
            rollout, transcript = rollouts[index], transcripts[index]
            if rollout.error is None and transcript is None:
                rollout.error = "the environment recorded no conversation"
            if rollout.error is not None:
                self.errored(group, index, rollout.error)
                continue
            assert transcript is not None
            row_origin = origin(self.config, group.spec, group.example_id, index, self.model)
            if self.dataset.add(row_origin.key, build_row(row_origin, rollout, transcript)):
                self.tally.accepted += 1
            else:
                self.tally.rejected += 1
            self.tally.reward_sum += rollout.reward

    def errored(self, group: Group, index: int, reason: str) -> None:
        self.tally.errored += 1
        if len(self.tally.errors) < 3:
            self.tally.errors.append(f"{group.spec.id} example {group.example_id} rollout {index}: {reason}")


async def synthesize(config: SynthesizeConfig) -> Tally:
    """Check the endpoint, open the dataset, roll out what is missing; the tally of this run."""
    client = config.client.model_copy(update={"api_key": config.client.resolved_api_key()})
    inference = InferenceClient.from_settings([client.base_url], client, model=config.model)
    try:
        model = await check_endpoint(inference.http, client.base_url, config.model)
        inference.model = model
        return await roll_out(config, inference, model)
    finally:
        await inference.close()


async def roll_out(config: SynthesizeConfig, inference: InferenceClient, model: str) -> Tally:
    """Load the environments, then open the dataset (nothing is written for an environment that does
    not load) and roll out what it lacks."""
    runner = RolloutRunner(inference, TurnRenderer(inference), config.env_timeout_s, transcripts={})
    environments, envs = EnvironmentCache(), list[Environment]()
    try:
        for env_index, spec in enumerate(config.env):
            envs.append(await load(environments, env_index, spec))
        dataset = Dataset(config.output_path, config.rejects_path, config.min_reward).open()
        try:
            groups = plan(config, envs, dataset, model)
            todo = sum(len(group.pending) for group in groups)
            logger.info("{} rollouts to do over {} examples ({} done already in {}), sampling {} at {}", todo,
                        len(groups), dataset.num_done, config.output_path, model, config.client.base_url)  # fmt: skip
            with tqdm(total=dataset.num_done + todo, initial=dataset.num_done, unit="rollout", file=sys.stderr,
                      disable=not progress_shown(config, sys.stderr), dynamic_ncols=True, desc="synthesize") as bar:  # fmt: skip
                return await Synthesizer(config, runner, dataset, model).run(groups, bar)
        finally:
            dataset.close()
    finally:
        for env in envs:  # what they started: a verifiers env's serving, an env server link
            close = getattr(env, "close", None)
            if close is not None:
                await close()


def progress_shown(config: SynthesizeConfig, stream: Any) -> bool:
    """The bar is drawn on a terminal only: in a log file or a pipe it would be a line per update."""
    return config.progress and stream.isatty()


def run_synthesize(config: SynthesizeConfig) -> int:
    """Roll out, write, and say what was written; a UserError (exit 1) when rollouts errored."""
    tally = asyncio.run(synthesize(config))
    where = f" ({tally.rejected} below min_reward into {config.rejects_path})" if tally.rejected else ""
    logger.info("wrote {} rows to {}{}; {} rollouts errored", tally.accepted, config.output_path, where,
                tally.errored)  # fmt: skip
    if tally.errored:
        attempted = tally.written + tally.errored
        raise UserError(f"{tally.errored} of {attempted} rollouts errored and were not written (first: "
                        f"{'; '.join(tally.errors)}); rerun the same command to try them again")  # fmt: skip
    return 0


def main(argv: Sequence[str]) -> int:
    """``rlbus synthesize``: its own config (files and flags only)."""
    from rlbus.services.entry import run_config_command

    return run_config_command("synthesize", SynthesizeConfig, argv, SUMMARY, run=run_synthesize, env={})
