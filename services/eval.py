"""``rlbus eval``: evaluate once against any OpenAI-compatible endpoint, in-process.

It reads the orchestrator's config (e.g. ``<output_dir>/configs/orchestrator.toml``)
plus a ``[client]`` table, builds the same eval tasks the orchestrator would
(``[[eval.env]]``: first ``num_examples`` examples, ``rollouts_per_example``
rollouts each), runs them with the env-worker's rollout code against
``client.base_url`` and reports ``eval/<env>/avg@k`` and ``pass@k``
(:mod:`rlbus.services.orchestrator.evaluation`). It exits 1 when more than
``max_error_fraction`` of an environment's rollouts errored. No bus, trainer or orchestrator
state is involved. The endpoint must return token ids and logprobs and offer
``/tokenize`` (vLLM does), since rollouts stay token-in/token-out.

A command beside the CLI, not part of any service: it joins the orchestrator's
eval planning to the env-worker's rollout code in one process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from loguru import logger
from pydantic import Field

from rlbus.errors import UserError
from rlbus.messages import Rollout, RolloutResult, RolloutTask, SamplingParams
from rlbus.services.env_worker.config import InferenceClientSettings
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.evaluation import EvalScheduler

RunTask = Callable[[RolloutTask], Awaitable[list[Rollout]]]
SUMMARY = (
    "Evaluate the [[eval.env]] environments once against an OpenAI-compatible endpoint (--client.base-url).\n"
    "Takes the orchestrator's config, e.g. <output_dir>/configs/orchestrator.toml."
)


class ClientConfig(InferenceClientSettings):
    """The OpenAI-compatible endpoint ``rlbus eval`` samples from (with the env-worker's client settings)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the API (ending in ``/v1``); ``/tokenize`` is expected at its root."""
    model: str | None = None
    """Model name sent with each request; None lets a single-model server choose."""
    max_concurrent_tasks: int = Field(16, ge=1)
    """Examples rolled out at once."""
    rollout_timeout_s: float = Field(600.0, gt=0)
    """Seconds the environment may spend on one rollout before it counts as failed."""


class EvalRunConfig(OrchestratorConfig):
    """The orchestrator's config plus the endpoint to evaluate; only ``eval`` and ``sampling`` are used."""

    SERVICE: ClassVar[str] = "eval"

    client: ClientConfig = ClientConfig()
    """Endpoint to evaluate."""
    max_error_fraction: float = Field(0.5, ge=0, le=1)
    """Exit 1 when more than this fraction of an environment's rollouts errored (metrics are still
    written): an endpoint that fails most requests must not pass for a model scoring 0. 1 never fails."""


async def evaluate(config: OrchestratorConfig, env_sizes: list[int], run_task: RunTask,
                   max_concurrent_tasks: int = 16) -> dict[str, float]:  # fmt: skip
    """Roll out every eval task with ``run_task`` and return the round's metrics."""
    if not config.eval.env:
        raise ValueError("nothing to evaluate: add at least one [[eval.env]] (id, num_examples, rollouts_per_example)")
    scheduler = EvalScheduler(config.eval.model_copy(update={"interval": 1}), env_sizes)
    numbers = iter(range(1, 1 << 62))
    planned = scheduler.start(0, lambda: f"eval-{next(numbers)}")
    sampling = SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                              max_tokens=config.sampling.max_tokens)  # fmt: skip
    slots = asyncio.Semaphore(max_concurrent_tasks)

    async def one(task_id: str, env_id: str, env_args: dict[str, Any], example_id: int, k: int) -> RolloutResult:
        task = RolloutTask(task_id=task_id, env_id=env_id, env_args=env_args, example_id=example_id,
                           num_rollouts=k, sampling=sampling, is_eval=True, lease_s=0.0, issued_at=0.0)  # fmt: skip
        async with slots:
            rollouts = await run_task(task)
        return RolloutResult(task_id=task_id, worker_id="rlbus-eval", env_id=env_id, example_id=example_id,
                             is_eval=True, rollouts=rollouts)  # fmt: skip

    logger.info("evaluating {} examples over {} environment(s)", len(planned), len(config.eval.env))
    results = await asyncio.gather(*(one(t, s.id, s.loader_args, e, s.rollouts_per_example) for t, s, e in planned))
    finished = None
    for result in results:
        finished = scheduler.record(result) or finished
    assert finished is not None, "every planned task has a result"
    return finished.metrics()


async def _evaluate_endpoint(config: EvalRunConfig) -> dict[str, float]:
    # The env-worker's rollout code: the same prompts, token handling and scoring as training.
    from rlbus.environments import EnvironmentCache
    from rlbus.services.env_worker.inference import InferenceClient
    from rlbus.services.env_worker.rollout import RolloutRunner
    from rlbus.services.env_worker.tokens import TurnRenderer

    client = config.client
    inference = InferenceClient.from_settings([client.base_url], client, model=client.model)
    runner = RolloutRunner(inference, TurnRenderer(inference), client.rollout_timeout_s)
    environments = EnvironmentCache()
    sizes = [(await environments.get(spec.id, spec.loader_args)).num_examples for spec in config.eval.env]

    async def run_task(task: RolloutTask) -> list[Rollout]:
        return await runner.run_task(task, await environments.get(task.env_id, dict(task.env_args)))

    try:
        return await evaluate(config, sizes, run_task, client.max_concurrent_tasks)
    finally:
        await inference.close()


def run_eval(config: EvalRunConfig) -> int:
    """Evaluate once, log the metrics and write them to ``<output_dir>/eval/metrics.json``."""
    metrics = asyncio.run(_evaluate_endpoint(config))
    for name, value in metrics.items():
        logger.info("{} = {:.4f}", name, value)
    path = config.output_dir / "eval" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"base_url": config.client.base_url, "metrics": metrics}, indent=2) + "\n")
    tmp.replace(path)
    logger.info("eval metrics written to {}", path)
    problem = too_many_errors(config, metrics)
    if problem is not None:
        raise UserError(problem)  # the entry's one last line and exit code 1; the metrics are written
    return 0


def too_many_errors(config: EvalRunConfig, metrics: dict[str, float]) -> str | None:
    """Why the round failed (one line), when some environment's errored rollouts exceed
    ``max_error_fraction``; None when every environment is within it."""
    for spec in config.eval.env:
        errored = metrics.get(f"eval/{spec.id}/errored_rollouts", 0.0)
        total = metrics.get(f"eval/{spec.id}/num_examples", float(spec.num_examples)) * spec.rollouts_per_example
        if total and errored / total > config.max_error_fraction:
            return (f"{errored:.0f} of {total:.0f} rollouts of {spec.id} errored ({errored / total:.0%} > "
                    f"max_error_fraction = {config.max_error_fraction:g}): check the endpoint "
                    f"({config.client.base_url}) and the log, or raise --max-error-fraction")
    return None


def main(argv: Sequence[str]) -> int:
    """``rlbus eval``: the orchestrator's config (``RLBUS_ORCHESTRATOR__*`` included) plus ``[client]``."""
    from rlbus.services.entry import run_config_command

    return run_config_command("eval", EvalRunConfig, argv, SUMMARY, run=run_eval)
