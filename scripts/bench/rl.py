"""Whole-loop RL speed: step time and how well generation overlaps training.

Runs the quickstart-size job (``configs/quickstart/rl.toml``: five real services,
vLLM on CPU) twice in this invocation, with ``max_async_level`` 0 and 1, through
``rlbus rl``, and reads the services' own timers from each run's ``metrics.jsonl``:

* step time: the trainer's ``time/step`` (it includes waiting for the batch, so in a
  steady state it is the time between steps);
* training time: ``time/step - time/wait_for_batch`` (forward/backward, optimizer,
  publishing weights);
* generation time: the orchestrator's ``time/generate`` (time since the previous batch
  was built, less ``time/wait_for_ckpt``, the wait for inference to load a newer policy);
* rollout tokens/s: prompt + completion tokens of the step's rollouts
  (``seq_len/mean`` x rollouts) over its generation time;
* trainer tokens/s: the trainer's ``perf/throughput``;
* overlap ratio: step time / max(generation time, training time). 1.0 is perfect
  overlap; a loop that alternates the two approaches (gen + train) / max.

Means are over the steps after ``--warmup-steps`` (the first ones include start-up).
By default the model is the quickstart's untrained tiny model with a length penalty
(so groups have reward differences and every step trains); ``--model`` takes e.g. the
quickstart's SFT weights. Each run starts vLLM afresh (a minute or two on a CPU).

    python scripts/bench/rl.py [--steps 8] [--warmup-steps 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from statistics import mean

from rlbus.config.base import BusEndpoints
from rlbus.ports import free_loopback_port

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart"


def overlay(folder: Path, async_level: int, length_penalty: float) -> Path:
    """Fresh ports (other jobs may hold the quickstart's) and the run's async level."""
    port = free_loopback_port()
    lines = ["[bus.endpoints]"] + [f'{name} = "tcp://127.0.0.1:{free_loopback_port()}"' for name in BusEndpoints.model_fields]
    lines += ["[inference]", f"port = {port}", "[env_worker]", f'inference_urls = ["http://127.0.0.1:{port}/v1"]']
    lines += ["[orchestrator]", f"max_async_level = {async_level}"]
    lines += ["[orchestrator.advantage]", f"length_penalty = {length_penalty}"]
    path = folder / f"bench_async{async_level}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_model(folder: Path) -> Path:
    out = folder / "model"
    subprocess.run([sys.executable, "-m", "rlbus", "model", "tiny", "@", str(QUICKSTART / "model.toml"),
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return out


def run_rl(folder: Path, model: Path, async_level: int, args: argparse.Namespace) -> tuple[Path, float]:
    """One ``rlbus rl`` run; returns its output folder and wall seconds."""
    output = folder / f"async{async_level}"
    command = [sys.executable, "-m", "rlbus", "rl", "@", str(QUICKSTART / "rl.toml"), "@",
               str(overlay(folder, async_level, args.length_penalty)), "--model", str(model),
               "--max-steps", str(args.steps), "--output-dir", str(output)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"rlbus rl (max_async_level={async_level}) failed; logs in {output}/logs")
    return output, time.perf_counter() - started


def by_step(path: Path, service: str) -> dict[int, dict]:
    """The last metrics line of ``service`` for each step."""
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("service") == service:
                rows[int(record["step"])] = {**rows.get(int(record["step"]), {}), **record}
    return rows


def figures(output: Path, batch_size: int, warmup_steps: int) -> dict[str, float]:
    metrics = output / "metrics.jsonl"
    trainer, orchestrator = by_step(metrics, "trainer"), by_step(metrics, "orchestrator")
    steps = [s for s in sorted(trainer) if s > warmup_steps and "time/step" in trainer[s] and s in orchestrator]
    if not steps:
        raise SystemExit(f"no steps after the {warmup_steps} warm-up steps in {metrics}: raise --steps")
    step_s = mean(trainer[s]["time/step"] for s in steps)
    train_s = mean(trainer[s]["time/step"] - trainer[s]["time/wait_for_batch"] for s in steps)
    generate_s = mean(orchestrator[s]["time/generate"] for s in steps)
    rollout_tokens = mean(orchestrator[s]["seq_len/mean"] * (batch_size - orchestrator[s]["errored_rollouts"])
                          for s in steps)  # fmt: skip
    return {
        "steps": len(steps),
        "step_s": step_s,
        "generate_s": generate_s,
        "train_s": train_s,
        "rollout_tok_s": rollout_tokens / generate_s,
        "trainer_tok_s": mean(trainer[s]["perf/throughput"] for s in steps),
        "overlap": step_s / max(generate_s, train_s),
        "reward": mean(orchestrator[s]["reward/all/mean"] for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the means")
    parser.add_argument("--model", type=Path, default=None, help="policy to start from (default: untrained tiny)")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="orchestrator.advantage.length_penalty (default: 0.5 without --model, else 0)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="limit per run")
    args = parser.parse_args()
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    if args.length_penalty is None:
        args.length_penalty = 0.5 if args.model is None else 0.0
    batch_size = tomllib.loads((QUICKSTART / "rl.toml").read_text())["orchestrator"]["batch_size"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as name:
        folder = Path(name)
        model = args.model or build_model(folder)
        results, walls = {}, {}
        for level in (0, 1):
            output, walls[level] = run_rl(folder, model, level, args)
            results[level] = figures(output, batch_size, args.warmup_steps)
    sys.stdout.write(f"quickstart-size RL ({model if args.model else 'untrained tiny model'}), "
                     f"{args.steps} steps per run, means over steps {args.warmup_steps + 1}-{args.steps}; "
                     f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after on "
                     f"{os.cpu_count()} cores\n")  # fmt: skip
    sys.stdout.write(f"{'async':>5} {'step s':>7} {'gen s':>6} {'train s':>7} {'rollout tok/s':>13} "
                     f"{'trainer tok/s':>13} {'overlap':>7} {'reward':>6} {'run s':>6}\n")  # fmt: skip
    for level, f in results.items():
        sys.stdout.write(f"{level:>5} {f['step_s']:>7.2f} {f['generate_s']:>6.2f} {f['train_s']:>7.2f} "
                         f"{f['rollout_tok_s']:>13.0f} {f['trainer_tok_s']:>13.0f} {f['overlap']:>7.2f} "
                         f"{f['reward']:>6.3f} {walls[level]:>6.0f}\n")  # fmt: skip
    speedup = results[0]["step_s"] / results[1]["step_s"]
    target = "met" if results[1]["overlap"] <= 1.15 else "NOT met"
    sys.stdout.write(f"overlap ratio (step / max(gen, train)): async 0 {results[0]['overlap']:.2f}, "
                     f"async 1 {results[1]['overlap']:.2f} (target <= 1.15: {target}); "
                     f"step time async 0 / async 1 = {speedup:.2f}x\n")  # fmt: skip


if __name__ == "__main__":
    main()
