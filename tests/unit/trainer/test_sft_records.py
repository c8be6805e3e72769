"""SFT writes metrics.jsonl and steps.jsonl itself, in the shapes the monitor writes for RL runs."""

import json

from rlbus.run_files import STEP_ROW_KEYS
from rlbus.services.trainer.sft_records import SftRecords


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_step_is_a_metrics_line_and_a_steps_row(tmp_path):
    records = SftRecords(tmp_path, "sft-rank0")
    for step in (1, 2):
        records.write(step, {"loss/mean": 2.0 / step, "optim/lr": 1e-4, "progress/tokens": 100.0 * step,
                             "time/step": 0.5})  # fmt: skip
    records.close()
    metrics = read(tmp_path / "metrics.jsonl")
    assert [(m["step"], m["service"], m["replica_id"], m["loss/mean"]) for m in metrics] == [
        (1, "sft", "sft-rank0", 2.0),
        (2, "sft", "sft-rank0", 1.0),
    ]
    rows = read(tmp_path / "steps.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["complete"] for r in rows)
    assert set(rows[1]) == {*STEP_ROW_KEYS, "sft/loss/mean", "sft/optim/lr", "sft/progress/tokens", "sft/time/step"}
    assert rows[1]["sft/progress/tokens"] == 200.0 and rows[1]["elapsed_s"] >= rows[0]["elapsed_s"] >= 0
    # Its charts, drawn as the run ends: the figures an SFT run has (no reward, no eval).
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["loss.png", "step_time.png"]
