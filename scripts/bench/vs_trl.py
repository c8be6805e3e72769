"""rlbus against TRL's GRPOTrainer: the same model, task, batch shape and hyper-parameters, one after the other.

For each setting, TRL (``scripts/bench/trl_grpo.py``: one process, ``model.generate``,
``loss_type="dapo"``, ``scale_rewards="none"``, no KL) and ``rlbus rl`` (the quickstart's
``configs/quickstart/rl.toml``: five services, vLLM on CPU) each run ``--steps`` steps of
8 examples x 8 rollouts of reverse-text (1-2 words), 64 max tokens, temperature 1, AdamW
with a constant rate after a 5-step warm-up, float32. Printed per side: wall time with and
without start-up, median generation and training time a step, completion tokens/s of
generation, p90 / median step time after the 5 warm-up steps (steady-state jitter; rlbus's
step time is the time between the trainer's consecutive reports), and the mean reward of the
first and last five steps.

"Without start-up" is, for TRL, from its first step to its last; for rlbus, from the moment
its inference replica serves (its first ``policy_loaded`` event) to the trainer's last
report. The last lines are ``vs_trl <setting> <TRL time / rlbus time>`` (without start-up).

Settings: ``tiny-async0`` and ``tiny-async1`` (the quickstart's SFT'd 1M-parameter model,
lr 3e-4, strictly on-policy and one step off-policy; off-policy, trainer and replica each get half
the cores: ``trainer.num_threads`` and ``inference.cpu_threads_bind``) and ``smollm2-async1``
(SmolLM2-135M-Instruct from ``rlbus model smollm2``, lr 1e-6). Needs the ``bench`` extra
(``pip install -e '.[bench]'``: TRL beside the CPU torch, no other torch).

    python scripts/bench/vs_trl.py [--settings tiny-async0,tiny-async1,smollm2-async1] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

from rlbus.config.base import BusEndpoints
from rlbus.ports import free_loopback_port

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart"
SFT_STEPS = 45
SETTINGS = ("tiny-async0", "tiny-async1", "smollm2-async1")
LEARNING_RATES = {"tiny": 3e-4, "smollm2": 1e-6}
# SmolLM2 never earns reverse-text reward (no tags): on both sides a length penalty (rlbus:
# orchestrator.advantage.length_penalty; TRL: the same term in its reward) gives every group a signal,
# so rlbus, which drops groups without one, trains on the same samples as TRL.
LENGTH_PENALTIES = {"tiny": 0.0, "smollm2": 0.5}
WARMUP_STEPS = 5
"""The learning-rate warm-up: steps left out of the steady-state p90 / median."""


@dataclass
class Side:
    """What one side of one setting measured."""

    wall_s: float
    steps_s: float
    generate_s: float
    train_s: float
    completion_tok_s: float
    rewards: list[float]
    first_rollouts_s: float
    """From launch until the first step's rollouts were all generated."""
    step_times: list[float]
    """Wall time of each step, in order (rlbus: between the trainer's consecutive reports, the first
    from the replica serving)."""

    def p90_over_median(self) -> float:
        """Steady-state jitter: p90 / median step time, after the warm-up steps."""
        steady = self.step_times[WARMUP_STEPS:] or self.step_times
        return float(numpy.percentile(steady, 90)) / statistics.median(steady)

    def row(self, name: str) -> str:
        first, last = statistics.mean(self.rewards[:5]), statistics.mean(self.rewards[-5:])
        return (f"{name:<6} {self.wall_s:7.1f} {self.first_rollouts_s:10.1f} {self.steps_s:8.1f} {self.generate_s:7.2f} "
                f"{self.train_s:6.2f} "
                f"{self.completion_tok_s:9.0f} {self.p90_over_median():12.2f}   {first:.3f} -> {last:.3f}")  # fmt: skip


def rlbus_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlbus", *args]


def run_quietly(command: list[str], what: str, timeout_s: float) -> float:
    """Run ``command``; its wall seconds. Exits naming ``what`` and the output tail when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"{what} failed (exit {result.returncode}): {' '.join(command)}")
    return time.perf_counter() - started


def prepare_model(kind: str, folder: Path, tiny_model: Path | None) -> Path:
    """The policy both sides start from: the quickstart's SFT'd tiny model, or SmolLM2."""
    if kind == "smollm2":
        out = folder / "smollm2"
        if not (out / "config.json").exists():
            run_quietly(rlbus_command("model", "smollm2", "--out", str(out)), "rlbus model smollm2", 1800)
        return out
    if tiny_model is not None:
        return tiny_model
    base, sft = folder / "tiny", folder / "tiny-sft"
    weights = sft / "weights" / f"step_{SFT_STEPS}"
    if not (weights / "config.json").exists():
        run_quietly(rlbus_command("model", "tiny", "@", str(QUICKSTART / "model.toml"), "--out", str(base)),
                    "rlbus model tiny", 600)  # fmt: skip
        sft_command = rlbus_command("sft", "@", str(QUICKSTART / "sft.toml"), "--model", str(base),
                                    "--output-dir", str(sft), "--max-steps", str(SFT_STEPS))  # fmt: skip
        run_quietly(sft_command, "rlbus sft", 1800)
    return weights


def run_trl(model: Path, kind: str, folder: Path, steps: int, timeout_s: float) -> Side:
    out = folder / f"trl-{kind}.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench" / "trl_grpo.py"), "--model", str(model),
               "--out", str(out), "--steps", str(steps), "--lr", str(LEARNING_RATES[kind]),
               "--length-penalty", str(LENGTH_PENALTIES[kind])]  # fmt: skip
    run_quietly(command, "TRL GRPOTrainer", timeout_s)
    result = json.loads(out.read_text())
    steps_ = result["steps"]
    return Side(
        wall_s=result["wall_s"], steps_s=result["steps_s"],
        generate_s=statistics.median(s["generate_s"] for s in steps_),
        train_s=statistics.median(s["train_s"] for s in steps_),
        completion_tok_s=statistics.median(s["completion_tokens"] / s["generate_s"] for s in steps_),
        rewards=[s["reward"] for s in steps_],
        first_rollouts_s=result["wall_s"] - result["steps_s"] + steps_[0]["generate_s"],
        step_times=[s["step_s"] for s in steps_],
    )  # fmt: skip


def overlay(folder: Path, name: str, kind: str, async_level: int) -> Path:
    """Fresh ports (the quickstart's may be taken), the setting's async level and learning rate."""
    port = free_loopback_port()
    lines = ["[bus.endpoints]"]
    lines += [f'{endpoint} = "tcp://127.0.0.1:{free_loopback_port()}"' for endpoint in BusEndpoints.model_fields]
    inference, trainer = [f"port = {port}"], []
    if async_level:
        # Generation and training at the same time on these cores: each side on its own core(s),
        # or both spin on every core (measured: steps up to 10x slower on 2 cores).
        cores = os.cpu_count() or 2
        first = cores // 2
        inference.append(
            f'cpu_threads_bind = "{first}"' if first == cores - 1 else f'cpu_threads_bind = "{first}-{cores - 1}"'
        )
        trainer.append(f"num_threads = {max(1, cores // 2)}")
    lines += ["[inference]", *inference, "[trainer]", *trainer]
    lines += ["[env_worker]", f'inference_urls = ["http://127.0.0.1:{port}/v1"]']
    lines += ["[orchestrator]", f"max_async_level = {async_level}"]
    lines += ["[orchestrator.advantage]", f"length_penalty = {LENGTH_PENALTIES[kind]}"]
    lines += ["[trainer.optimizer]", f"lr = {LEARNING_RATES[kind]}"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_rlbus(model: Path, name: str, kind: str, async_level: int, folder: Path, steps: int,
              timeout_s: float) -> Side:  # fmt: skip
    output = folder / name
    command = rlbus_command("rl", "@", str(QUICKSTART / "rl.toml"), "@", str(overlay(folder, name, kind, async_level)),
                            "--model", str(model), "--max-steps", str(steps), "--output-dir", str(output),
                            "--clean-output-dir")  # fmt: skip
    launched = time.time()
    wall_s = run_quietly(command, f"rlbus rl ({name})", timeout_s)
    return rlbus_side(output, wall_s, launched)


def rlbus_side(output: Path, wall_s: float, launched: float) -> Side:
    """What a finished ``rlbus rl`` run in ``output`` measured (launched at ``launched``, epoch s)."""
    metrics, events = jsonl(output / "metrics.jsonl"), jsonl(output / "events.jsonl")
    trainer = [m for m in metrics if m["service"] == "trainer" and "loss/mean" in m]
    orchestrator = {m["step"]: m for m in metrics if m["service"] == "orchestrator" and "time/generate" in m}
    serving = min(e["time"] for e in events if e["kind"] == "policy_loaded")
    steps_ = sorted(orchestrator)
    return Side(
        wall_s=wall_s, steps_s=max(m["time"] for m in trainer) - serving,
        generate_s=statistics.median(orchestrator[s]["time/generate"] for s in steps_),
        train_s=statistics.median(m["time/step"] - m["time/wait_for_batch"] for m in trainer),
        completion_tok_s=statistics.median(orchestrator[s]["batch/num_loss_tokens"] / orchestrator[s]["time/generate"]
                                           for s in steps_),
        rewards=[orchestrator[s]["reward/all/mean"] for s in steps_],
        # the step's samples are recorded as the orchestrator builds its batch from them
        first_rollouts_s=min(r["time"] for r in jsonl(output / "samples.jsonl")) - launched,
        # the first step counts from the replica serving, as steps_s does
        step_times=numpy.diff([serving, *sorted(m["time"] for m in trainer)]).tolist(),
    )  # fmt: skip


def ensure_trl() -> None:
    """Install the bench extra (TRL beside the CPU torch) if this interpreter lacks it."""
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.stderr.write("[vs_trl] installing TRL (the bench extra: trl==1.16.0, datasets<5)\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "trl==1.16.0", "datasets<5"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=30, help="steps of the tiny-model settings")
    parser.add_argument(
        "--smollm2-steps",
        type=int,
        default=6,
        help="steps of smollm2-async1 (~2 min a step here; more than the 5 warm-up steps)",
    )
    parser.add_argument(
        "--tiny-model",
        type=Path,
        default=None,
        help="the quickstart's SFT weights (default: built here, as the quickstart does)",
    )
    parser.add_argument("--folder", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="limit per run")
    args = parser.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    if unknown := sorted(set(settings) - set(SETTINGS)):
        parser.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    ensure_trl()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    folder.mkdir(parents=True, exist_ok=True)
    ratios = {}
    for setting in settings:
        kind, async_level = setting.split("-async")[0], int(setting.split("-async")[1])
        model = prepare_model(kind, folder, args.tiny_model)
        steps = args.smollm2_steps if kind == "smollm2" else args.steps
        trl = run_trl(model, kind, folder, steps, args.timeout_s)
        ours = run_rlbus(model, setting, kind, async_level, folder, steps, args.timeout_s)
        sys.stdout.write(f"\n{setting}: {steps} steps of 8 x 8 rollouts, {model}\n"
                         "side    wall s  1st gen s  steps s  gen s/step  train s/step  gen tok/s  step p90/med  reward first 5 -> last 5\n"
                         f"{trl.row('TRL')}\n{ours.row('rlbus')}\n"
                         f"TRL / rlbus: {trl.steps_s / ours.steps_s:.2f} without start-up, "
                         f"{trl.wall_s / ours.wall_s:.2f} with it\n")  # fmt: skip
        sys.stdout.flush()
        ratios[setting] = trl.steps_s / ours.steps_s
    sys.stdout.write(f"\n(runs in {folder}; load average {os.getloadavg()[0]:.1f} at the end)\n")
    for setting, ratio in ratios.items():
        sys.stdout.write(f"vs_trl {setting} {ratio:.2f}\n")


if __name__ == "__main__":
    main()
