"""``rlbus sft --bench``: the real SFT loop for a few steps, then the table of its own figures."""

import json
import statistics

import pytest

from rlbus.services.cli import main as rlbus
from tests.bench_table import parse_bench_table
from tests.conftest import free_tcp_port

pytestmark = pytest.mark.slow


def shown(value: float):
    """``value`` as the table shows it: three significant digits, whole numbers from 100 on."""
    return pytest.approx(value, rel=6e-3, abs=0.5 if abs(value) >= 99.5 else 0.0)


def test_sft_bench_prints_the_figures_of_its_steps(tiny_model_dir, tmp_path, capsys):
    telemetry = f"tcp://127.0.0.1:{free_tcp_port()}"  # no monitor listens: reports are dropped
    argv = ["sft", "--bench", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path),
            "--data.synthetic", "reverse-text", "--data.num-examples", "64", "--batch-size", "8", "--seq-len", "256",
            "--peak-flops", "1e11", "--bus.endpoints.monitor-telemetry", telemetry,
            # All of these are turned off by --bench.
            "--data.val-fraction", "0.2", "--val-interval", "2", "--ckpt.enabled", "--ckpt.interval", "2"]  # fmt: skip
    assert rlbus(argv) == 0
    table = parse_bench_table(capsys.readouterr().out)
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5] == sorted(table.steps)  # 5 steps unless fewer are asked
    assert table.headers == ["step s", "trainer tok/s", "MFU %", "peak mem GiB", "fwd+bwd s"]
    for row in rows:  # each line shows its step's own figures
        cells = table.steps[row["step"]]
        assert float(cells["trainer tok/s"]) == shown(row["sft/perf/throughput"])
        assert float(cells["MFU %"]) == shown(100 * row["sft/perf/mfu"])
        assert float(cells["peak mem GiB"]) == shown(row["sft/perf/peak_memory"])
    measured = rows[1:]  # step 1 is warm-up
    for header, key, scale in [("trainer tok/s", "sft/perf/throughput", 1), ("MFU %", "sft/perf/mfu", 100),
                               ("step s", "sft/time/step", 1)]:  # fmt: skip
        mean, std = table.mean[header]
        values = [scale * row[key] for row in measured]
        assert mean == shown(statistics.fmean(values)) and mean > 0
        assert std == shown(statistics.stdev(values))
    assert table.mean["peak mem GiB"][0] > 0.05  # the trainer process's max RSS, GiB: at least torch's own
    # Checkpoints, final weights and validation were off.
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "weights").exists()
    assert not any("sft/val/loss" in row for row in rows)
