"""Orchestrator restart time after a long run against after a short one, in the same run.

Drives the orchestrator core (no sockets, no peers: the messages are method calls) through
``--short`` and ``--long`` steps of ``--groups`` groups of ``--rollouts`` rollouts of
``--tokens`` completion tokens each, with a progress checkpoint every ``--interval`` steps
(the journal is compacted at each). Each run ends as a crash would leave it: the last step
acknowledged and checkpointed, the next one built but not acknowledged, one more group
accepted. A restart is what ``OrchestratorService`` does before it opens sockets: load the
latest progress, replay the journal, open it (repairing a torn tail) and build the core
(which rebuilds the unacknowledged step).

Restarts of the two runs alternate so they see the same machine load; the figures are
medians over ``--repeats``. ``uncompacted`` replays the long run's whole history from one
file (what every restart read before compaction), for reference. The last line is
``orchestrator_restart 1000_vs_10 <ratio>`` (long over short; target <= 2.0).

    python scripts/bench/orchestrator_restart.py [--short 10] [--long 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlbus.logging import setup_logging
from rlbus.messages import BatchAck, PolicyLoaded, Rollout, RolloutResult, RolloutTask, TaskRequest, Turn
from rlbus.services.orchestrator.checkpoint import ProgressStore
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.core import Orchestrator
from rlbus.services.orchestrator.journal import Journal

TRAIN_SIZES = [100_000]
PROMPT_LEN = 64


def make_config(folder: Path, args: argparse.Namespace) -> OrchestratorConfig:
    return OrchestratorConfig(
        batch_size=args.groups * args.rollouts, rollouts_per_example=args.rollouts, max_steps=None,
        seq_len=2 * (PROMPT_LEN + args.tokens), output_dir=folder, max_async_level=1,
        train={"env": [{"id": "bench", "ratio": 1.0}]}, ckpt={"interval": args.interval, "resume_step": -1},
    )  # fmt: skip


def roll_out(task: RolloutTask, policy_step: int, tokens: int) -> RolloutResult:
    """A scored group for ``task``: rewards alternate so the group has signal."""
    rollouts = []
    for i in range(task.num_rollouts):
        turn = Turn(prompt_ids=list(range(1, PROMPT_LEN + 1)), completion_ids=[1000 + i] * tokens,
                    completion_logprobs=[-0.5] * tokens, completion_mask=[True] * tokens,
                    policy_step=policy_step)  # fmt: skip
        rollouts.append(Rollout(rollout_id=f"{task.task_id}/{i}", turns=[turn], reward=float(i % 2),
                                prompt_text="q" * 200, completion_text="a" * 4 * tokens,
                                timing={"generate": 1.0, "score": 0.01}))  # fmt: skip
    return RolloutResult(task_id=task.task_id, worker_id="bench-worker", env_id=task.env_id,
                         example_id=task.example_id, rollouts=rollouts)  # fmt: skip


def feed(core: Orchestrator, tokens: int) -> int:
    """Grant credits and answer every task sent; the step being built."""
    step = core.step
    core.on_policy_loaded(PolicyLoaded(replica_id="inference-0", base_url="http://x", step=step - 1, loaded_at=0))
    core.on_task_request(b"w", TaskRequest(worker_id="w", num_tasks=core.groups_per_batch))
    for _, task in core.tick().tasks:
        if not core.on_result(roll_out(task, step - 1, tokens)).accepted:
            raise RuntimeError(f"the core refused the result of {task.task_id}")
    return step


def run(folder: Path, num_steps: int, args: argparse.Namespace) -> None:
    """``num_steps`` steps trained and checkpointed, one more built, one more group accepted."""
    config = make_config(folder, args)
    progress_folder = folder / "checkpoints" / "orchestrator"
    journal = Journal(progress_folder / "journal.jsonl").open()
    core = Orchestrator(config, TRAIN_SIZES, [], ProgressStore(progress_folder), journal=journal)
    for _ in range(num_steps):
        step = feed(core, args.tokens)
        core.tick()
        core.on_batch_ack(BatchAck(trainer_id="trainer", step=step))
    feed(core, args.tokens)
    core.tick()  # built, not acknowledged
    core.on_task_request(b"w", TaskRequest(worker_id="w", num_tasks=1))
    task = next(task for _, task in core.tick().tasks)
    core.on_result(roll_out(task, core.step - 1, args.tokens))
    journal.close()


def restart(folder: Path, args: argparse.Namespace, journal_name: str = "journal.jsonl") -> float:
    """Seconds from nothing to a core ready to serve, as ``OrchestratorService`` builds it."""
    started = time.perf_counter()
    config = make_config(folder, args)
    progress_folder = folder / "checkpoints" / "orchestrator"
    progress = ProgressStore(progress_folder)
    resume = progress.load(-1)
    journal = Journal(progress_folder / journal_name)
    replay = journal.replay(resume.step)
    journal.open()
    core = Orchestrator(config, TRAIN_SIZES, [], progress, resume, journal=journal, replay=replay)
    seconds = time.perf_counter() - started
    journal.close()
    if core.step != resume.step + 2 or len(core.buffer) != 1:
        raise RuntimeError(f"restart at step {core.step} with {len(core.buffer)} buffered group(s), expected "
                           f"step {resume.step + 2} and 1 group")  # fmt: skip
    return seconds


def uncompacted(folder: Path) -> Path:
    """The long run's whole history in one journal file (a copy, beside the real one)."""
    journal = Journal(folder / "checkpoints" / "orchestrator" / "journal.jsonl")
    path = journal.path.with_name("journal.full.jsonl")
    with open(path, "wb") as out:
        for file in [*journal.segments(), journal.path]:
            with open(file, "rb") as handle:
                lines = list(handle)
            # Leave out what a compaction carried over: the records up to its "known" record.
            carried = [i for i, line in enumerate(lines) if line.startswith(b'{"kind":"known"')]
            out.writelines(lines[carried[0] + 1 if carried else 0 :])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=10, help="progress checkpoint (and compaction) interval")
    parser.add_argument("--groups", type=int, default=8, help="groups per step")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    parser.add_argument("--tokens", type=int, default=256, help="completion tokens per rollout")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.short % args.interval or args.long % args.interval:
        parser.error(f"--short {args.short} and --long {args.long} must be multiples of --interval {args.interval}")
    setup_logging("bench", None, level="warning")

    with tempfile.TemporaryDirectory(prefix="rlbus-restart-bench-") as tmp:
        folders = {"short": Path(tmp) / "short", "long": Path(tmp) / "long"}
        built = {}
        for name, num_steps in (("short", args.short), ("long", args.long)):
            started = time.perf_counter()
            run(folders[name], num_steps, args)
            built[name] = time.perf_counter() - started
        full = uncompacted(folders["long"])
        seconds: dict[str, list[float]] = {"short": [], "long": [], "uncompacted": []}
        for _ in range(args.repeats):
            seconds["short"].append(restart(folders["short"], args))
            seconds["long"].append(restart(folders["long"], args))
            seconds["uncompacted"].append(restart(folders["long"], args, full.name))
        sizes = {"short": (folders["short"] / "checkpoints" / "orchestrator" / "journal.jsonl").stat().st_size,
                 "long": (folders["long"] / "checkpoints" / "orchestrator" / "journal.jsonl").stat().st_size,
                 "uncompacted": full.stat().st_size}  # fmt: skip

    steps = {"short": args.short, "long": args.long, "uncompacted": args.long}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    sys.stdout.write(f"{'run':<12} {'steps':>6} {'journal KB':>10} {'restart ms':>10} {'vs short':>8}\n")
    for name in ("short", "long", "uncompacted"):
        sys.stdout.write(f"{name:<12} {steps[name]:>6} {sizes[name] / 1e3:>10.1f} {median[name] * 1e3:>10.1f} "
                         f"{median[name] / median['short']:>8.2f}\n")  # fmt: skip
    sys.stdout.write(f"(runs driven in {built['short']:.1f}s and {built['long']:.1f}s)\n")
    sys.stdout.write(f"orchestrator_restart {args.long}_vs_{args.short} {median['long'] / median['short']:.2f}\n")


if __name__ == "__main__":
    main()
