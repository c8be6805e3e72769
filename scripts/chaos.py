"""Chaos matrix: kill -9 each service of a real run (vLLM on CPU, tiny model), restart it, print a table.

    python scripts/chaos.py                 # one run, the five services killed one after the other
    python scripts/chaos.py --separate      # one run per service (five vLLM starts: slower)
    python scripts/chaos.py --services trainer,inference --max-steps 8
    python scripts/chaos.py --join            # also: a replica and an env-worker join, the first replica leaves

Each killed service is started again with its own command (``rlbus <service> @
<run>/configs/<service>.toml``). Columns: the trainer step when it was killed; seconds
until the restarted service was ready and until the run completed a trainer step
after that; then what the run's files say (tests.integration.chaos_run.audit): trainer
steps contiguous, steps trained twice or skipped, accepted rollouts lost. In a single
run the last columns describe the whole run, so they repeat on every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from loguru import logger

# The harness lives with the tests (tests/integration/chaos_run.py); run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlbus.ports import free_loopback_port  # noqa: E402
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model  # noqa: E402
from tests.integration.chaos_run import (  # noqa: E402
    Audit,
    ChaosRun,
    Recovery,
    accepted_by,
    audit,
    requests_served,
    write_config,
)  # fmt: skip

SERVICES = ("trainer", "inference", "env-worker-0", "orchestrator", "monitor")
FIRST_KILL_STEP, STEPS_BETWEEN_KILLS = 2, 2
STEPS_AFTER_LAST_KILL = 7
"""Room for the last killed service to come back and the run to make a step after it."""
JOIN_MAX_STEPS = 40
"""Enough steps for a second vLLM replica to start on a CPU while the run goes on."""


def run_once(folder: Path, model: Path, services: list[str], max_steps: int) -> tuple[list[Recovery], Audit]:
    folder.mkdir(parents=True, exist_ok=True)
    run = ChaosRun(write_config(folder, model, max_steps), timeout_s=900)
    try:
        run.start_all()
        for index, name in enumerate(services):
            run.wait_for_step(FIRST_KILL_STEP + STEPS_BETWEEN_KILLS * index)
            run.kill_and_restart(name)
        run.wait_for_end()
    finally:
        run.stop_all()
    return run.recoveries, audit(run)


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


def table(rows: list[tuple[Recovery, Audit]]) -> str:
    header = ("service", "kill step", "ready s", "recovery s", "steps contiguous", "trained twice", "skipped",
              "rollouts lost", "accepted")  # fmt: skip
    lines = [header]
    for recovery, result in rows:
        lines.append((recovery.name, str(recovery.kill_step), f"{recovery.ready_s:.1f}", f"{recovery.recovery_s:.1f}",
                      "yes" if result.contiguous else f"NO {sorted(set(result.trained_steps))}",
                      str(len(result.duplicate_steps) + len(result.groups_in_two_steps)),
                      str(len(result.skipped_steps)), str(len(result.lost_rollouts)), str(result.num_accepted)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", default=",".join(SERVICES),
                        help="comma-separated process names to kill; none: no kill run (with --join)")
    parser.add_argument("--separate", action="store_true", help="one run per killed service")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per run (default: enough for the kills)")
    parser.add_argument("--join", action="store_true", help="also a run where a replica and an env-worker join "
                        "and the first replica leaves (a second vLLM: slower)")
    parser.add_argument("--folder", type=Path, default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    services = [name for name in args.services.split(",") if name and name != "none"]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rlbus-chaos-"))
    model = build_tiny_model(folder / "tiny", TinyModelConfig(out=folder / "tiny"))
    plans = [[name] for name in services] if args.separate else [services] if services else []
    rows = []
    for plan in plans:
        max_steps = args.max_steps or FIRST_KILL_STEP + STEPS_BETWEEN_KILLS * (len(plan) - 1) + STEPS_AFTER_LAST_KILL
        recoveries, result = run_once(folder / "-".join(plan), model, plan, max_steps)
        rows += [(recovery, result) for recovery in recoveries]
    if rows:
        sys.stdout.write(table(rows) + "\n")
    results = [result for _, result in rows]
    if args.join:
        joined = join_and_leave(folder / "join-leave", model)
        sys.stdout.write(f"join/leave run: steps contiguous {joined.contiguous}, trained twice "
                         f"{len(joined.duplicate_steps) + len(joined.groups_in_two_steps)}, skipped "
                         f"{len(joined.skipped_steps)}, rollouts lost {len(joined.lost_rollouts)}\n")
        results.append(joined)
    logger.info("runs in {}", folder)
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
