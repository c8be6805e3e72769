"""scripts/bench/vs_trl.py: what it reads from a finished rlbus run (timings, rewards, step jitter)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "scripts" / "bench" / "vs_trl.py")
vs_trl = importlib.util.module_from_spec(spec)
sys.modules["vs_trl"] = vs_trl  # dataclasses look their module up there
spec.loader.exec_module(vs_trl)

LAUNCHED = 1000.0


def write_run(folder: Path, step_gaps: list[float]) -> None:
    """A run whose replica serves at +10 s, then trains one step after each gap."""
    serving, now, metrics, samples = LAUNCHED + 10, LAUNCHED + 10, [], []
    for step, gap in enumerate(step_gaps, start=1):
        now += gap
        metrics.append({"step": step, "service": "orchestrator", "time": now - 0.5, "time/generate": 0.5,
                        "batch/num_loss_tokens": 1000, "reward/all/mean": 0.1 * step})  # fmt: skip
        metrics.append({"step": step, "service": "trainer", "time": now, "loss/mean": 0.0, "time/step": gap,
                        "time/wait_for_batch": gap - 0.8})  # fmt: skip
        samples.append({"step": step, "time": now - 0.5})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (folder / "events.jsonl").write_text(json.dumps({"kind": "policy_loaded", "time": serving}) + "\n")
    (folder / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")


def test_rlbus_side_reads_timings_rewards_and_steady_state_jitter(tmp_path):
    # 5 warm-up steps (one slow: left out), then 10 steady steps of 1 s with one 3 s outlier.
    gaps = [1.0, 6.0, 1.0, 1.0, 1.0] + [1.0] * 9 + [3.0]
    write_run(tmp_path, gaps)
    side = vs_trl.rlbus_side(tmp_path, wall_s=50.0, launched=LAUNCHED)
    assert side.steps_s == pytest.approx(sum(gaps))
    assert side.generate_s == 0.5 and side.train_s == pytest.approx(0.8)
    assert side.completion_tok_s == pytest.approx(2000)
    assert side.first_rollouts_s == pytest.approx(10 + 1.0 - 0.5)
    assert side.rewards == pytest.approx([0.1 * s for s in range(1, 16)])
    assert side.step_times == pytest.approx(gaps)  # the first from the replica serving
    assert side.p90_over_median() == pytest.approx(1.2)  # numpy's p90 of nine 1s and one 3
    assert "1.20" in side.row("rlbus")


def test_jitter_of_a_run_shorter_than_the_warm_up_uses_every_step():
    side = vs_trl.Side(wall_s=1, steps_s=1, generate_s=1, train_s=1, completion_tok_s=1, rewards=[0.0] * 5,
                       first_rollouts_s=1, step_times=[1.0, 2.0, 3.0])  # fmt: skip
    assert side.p90_over_median() == pytest.approx(2.8 / 2.0)
