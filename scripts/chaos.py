"""Chaos matrix: kill -9 each service of a real run (vLLM on CPU, tiny model), restart it, print a table.

    python scripts/chaos.py                 # async levels 0 and 1: one run each, every kill in it
    python scripts/chaos.py --separate      # one run per killed service, and one for the fault points
    python scripts/chaos.py --async-levels 1 --services trainer,inference --no-faults --max-steps 8
    python scripts/chaos.py --join            # also: a replica and an env-worker join, the first replica leaves

Each killed service is started again with its own command (``rlbus <service> @
<run>/configs/<service>.toml``). Two kinds of kill (tests/integration/chaos_run.py):

- timed: SIGKILL from outside at a trainer step, for each of the five services;
- at a fault point (``rlbus.faults``): the trainer between writing a checkpoint and renaming it,
  and between the rename and its BatchAck; the orchestrator between saving progress and compacting
  its journal, and between journaling a result and its ResultAck.

Columns: async level, the process, how it was killed, the trainer step then; seconds until the
restarted service was ready and until the run completed a trainer step after that; then the
exactly-once audit (tests/integration/chaos_audit.py), read from the env-workers' and the
trainer's own audit trails, not from the orchestrator's journal under test: steps contiguous,
steps or groups trained twice, steps skipped, results acknowledged to a worker but never trained
(lost), results acknowledged, and of those dropped as stale or left in the buffer at the end. In a
run with several kills the audit columns describe the whole run, so they repeat on every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from loguru import logger

# The harness lives with the tests (tests/integration/chaos_run.py); run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlbus.ports import free_loopback_port
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.chaos_run import (
    Audit,
    ChaosFailure,
    ChaosRun,
    Recovery,
    accepted_by,
    audit,
    requests_served,
    write_config,
)  # fmt: skip

SERVICES = ("trainer", "inference", "env-worker-0", "orchestrator", "monitor")
FAULTS = {
    "trainer": ["trainer.checkpoint_before_rename:2", "trainer.before_batch_ack:2"],
    "orchestrator": ["orchestrator.before_compaction:3", "orchestrator.before_result_ack:4"],
}
"""Process -> the fault points of its first starts, one item a start: each fires within a few steps."""
FAULT_STEPS = 5
"""Trainer steps by which the fault points above have fired: timed kills come after."""
FIRST_KILL_STEP, STEPS_BETWEEN_KILLS = 2, 2
STEPS_AFTER_LAST_KILL = 7
"""Room for the last killed service to come back and the run to make a step after it."""
JOIN_MAX_STEPS = 40
"""Enough steps for a second vLLM replica to start on a CPU while the run goes on."""


@dataclass
class Plan:
    async_level: int
    services: list[str]
    """Killed from outside, one after the other."""
    faults: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"async{self.async_level}-" + "-".join([*self.services, *(["faults"] if self.faults else [])])

    def kill_steps(self) -> list[int]:
        first = FAULT_STEPS + 1 if self.faults else FIRST_KILL_STEP
        return [first + STEPS_BETWEEN_KILLS * index for index in range(len(self.services))]

    def max_steps(self) -> int:
        return max([FAULT_STEPS if self.faults else 0, *self.kill_steps()]) + STEPS_AFTER_LAST_KILL


def run_once(folder: Path, model: Path, plan: Plan, max_steps: int | None) -> tuple[list[Recovery], Audit]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder, model, max_steps or plan.max_steps(), max_async_level=plan.async_level)
    run = ChaosRun(config, timeout_s=900)
    for name, specs in plan.faults.items():
        run.arm(name, *specs)
    try:
        run.start_all()
        for name, step in zip(plan.services, plan.kill_steps()):
            run.wait_for_step(step)
            run.kill_and_restart(name)
        run.wait_for_end()
    finally:
        run.stop_all()
    return sorted(run.recoveries, key=lambda r: r.killed_at), audit(run)


def join_and_leave(folder: Path, model: Path) -> Audit:
    """An env-worker and an inference replica join at step 2; once the new replica served, the
    original one is killed for good: the run must go on, routed around it, and finish."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    run = ChaosRun(write_config(folder, model, JOIN_MAX_STEPS, extra_inference_port=port), timeout_s=900)
    try:
        run.start_all()
        run.wait_for_step(2)
        started = time.monotonic()
        run.join_env_worker("env-worker-joined")
        run.join_inference("inference-joined", port)
        url = run.inference_url("inference-joined")
        ready_at = run.wait_until(lambda: run._ready("inference-joined", 0), "the joined replica to be ready")
        health = httpx.get(url + "/health", timeout=10).json()
        step_at_ready = run.trainer_step()
        served_at = run.wait_until(lambda: requests_served(url) > 0, "the joined replica to serve a request")
        worked_at = run.wait_until(lambda: accepted_by(run, "env-worker-joined") > 0, "the joined worker's results")
        run.kill("inference")  # leave: not restarted
        del run.children["inference"]
        left_at, step_at_leave = time.monotonic(), run.trainer_step()
        progressed_at = run.wait_until(lambda: run.trainer_step() >= step_at_leave + 2,
                                       "two trainer steps without the original replica")  # fmt: skip
        run.wait_for_end()
    finally:
        run.stop_all()
    sys.stdout.write(
        f"hot join at trainer step 2: inference-joined ready after {ready_at - started:.1f}s serving policy step "
        f"{health['policy_step']} ({health['source']}; the trainer was at step {step_at_ready}); first request "
        f"served after {served_at - started:.1f}s; env-worker-joined's first accepted result after "
        f"{worked_at - started:.1f}s\nleave: the original replica killed at trainer step {step_at_leave}, not "
        f"restarted; two more steps in {progressed_at - left_at:.1f}s; the run finished\n"
    )  # fmt: skip
    return audit(run)


def table(rows: list[tuple[int, Recovery, Audit]]) -> str:
    header = ("async", "process", "killed", "kill step", "ready s", "recovery s", "steps contiguous", "trained twice",
              "skipped", "lost", "acked", "stale", "left over")  # fmt: skip
    lines = [header]
    for level, recovery, result in rows:
        lines.append((str(level), recovery.name, recovery.how, str(recovery.kill_step), f"{recovery.ready_s:.1f}",
                      f"{recovery.recovery_s:.1f}", "yes" if result.contiguous else f"NO {result.trained_steps}",
                      str(len(result.duplicate_steps) + len(result.trained_twice)), str(len(result.skipped_steps)),
                      str(len(result.lost)), str(result.num_acked), str(result.num_stale),
                      str(result.num_left_over)))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def make_plans(levels: list[int], services: list[str], separate: bool, with_faults: bool) -> list[Plan]:
    faults = FAULTS if with_faults else {}
    if not separate:
        return [Plan(level, services, faults) for level in levels if services or faults]
    singles = [Plan(level, [name]) for level in levels for name in services]
    return singles + ([Plan(level, [], faults) for level in levels] if faults else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--services", default=",".join(SERVICES), help="comma-separated process names to kill; none: no timed kill"
    )
    parser.add_argument("--async-levels", default="0,1", help="comma-separated orchestrator.max_async_level values")
    parser.add_argument("--no-faults", action="store_true", help="no kills at fault points")
    parser.add_argument("--separate", action="store_true", help="one run per killed service")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per run (default: enough for the kills)")
    parser.add_argument(
        "--join",
        action="store_true",
        help="also a run where a replica and an env-worker join and the first replica leaves (a second vLLM: slower)",
    )
    parser.add_argument("--folder", type=Path, default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    services = [name for name in args.services.split(",") if name and name != "none"]
    levels = [int(level) for level in args.async_levels.split(",") if level]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rlbus-chaos-"))
    model = build_tiny_model(folder / "tiny", TinyModelConfig(out=folder / "tiny"))
    rows, results, failures = [], [], []
    for plan in make_plans(levels, services, args.separate, not args.no_faults):
        try:
            recoveries, result = run_once(folder / plan.name, model, plan, args.max_steps)
        except ChaosFailure as exc:  # the other runs still go; the failure is printed under the table
            failures.append(f"{plan.name}: {exc}")
            continue
        rows += [(plan.async_level, recovery, result) for recovery in recoveries]
        results.append(result)
    if rows:
        sys.stdout.write(table(rows) + "\n")
    for failure in failures:
        sys.stdout.write(f"FAILED {failure}\n")
    if args.join:
        joined = join_and_leave(folder / "join-leave", model)
        sys.stdout.write(
            f"join/leave run: steps contiguous {joined.contiguous}, trained twice "
            f"{len(joined.duplicate_steps) + len(joined.trained_twice)}, skipped "
            f"{len(joined.skipped_steps)}, lost {len(joined.lost)}\n"
        )
        results.append(joined)
    logger.info("runs in {}", folder)
    return 0 if results and not failures and all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
