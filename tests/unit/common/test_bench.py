"""The ``--bench`` table (rlbus.bench) from recorded steps.jsonl rows."""

import io
import statistics

import pytest
from loguru import logger

from rlbus.bench import RL_BENCH, SFT_BENCH, bench_steps, bench_table, print_bench_table
from tests.bench_table import parse_bench_table


def rl_row(step, step_s, tokens_per_s, mfu, memory_gib, completion_tokens, generate_s, loss_tokens=500.0):
    """A steps.jsonl row of an RL run, with the keys the monitor writes (and some it writes besides)."""
    return {
        "step": step, "time": 1.8e9 + step, "elapsed_s": 3.0 * step, "complete": True,
        "trainer/time/step": step_s, "trainer/perf/throughput": tokens_per_s, "trainer/perf/mfu": mfu,
        "trainer/perf/peak_memory": memory_gib, "trainer/time/wait_for_batch": step_s / 2,
        "trainer/time/forward_backward": step_s / 4, "trainer/time/broadcast_weights": 0.15,
        "trainer/progress/loss_tokens": loss_tokens, "trainer/loss/mean": 0.01,
        "orchestrator/num_completion_tokens/sum": completion_tokens, "orchestrator/time/generate": generate_s,
        "orchestrator/reward/all/mean": 0.1, "inference/tokens_per_s": 1500.0,
    }  # fmt: skip


ROWS = [
    rl_row(1, 75.5, 0.34, 2.6e-5, 0.564, 3424.0, 80.0),
    rl_row(2, 2.68, 310.0, 5.9e-4, 0.569, 3246.0, 1.10),
    rl_row(3, 2.62, 290.0, 5.2e-4, 0.571, 3397.0, 0.97),
    rl_row(4, 2.71, 305.0, 5.6e-4, 0.572, 3301.0, 1.05),
]


def test_rl_table_has_a_row_per_step_and_mean_std_after_the_warm_up_step():
    table = parse_bench_table("\n".join(bench_table(ROWS, RL_BENCH)))
    assert table.title.startswith("rlbus rl bench: 4 steps; mean ± std over steps 2-4 (step 1 is warm-up)")
    assert table.headers == ["step s", "trainer tok/s", "MFU %", "peak mem GiB", "gen tok/s", "wait batch s",
                             "fwd+bwd s", "publish s", "generate s"]  # fmt: skip
    assert sorted(table.steps) == [1, 2, 3, 4]
    measured = ROWS[1:]
    expected = {
        "step s": [r["trainer/time/step"] for r in measured],
        "trainer tok/s": [r["trainer/perf/throughput"] for r in measured],
        "MFU %": [100 * r["trainer/perf/mfu"] for r in measured],
        "peak mem GiB": [r["trainer/perf/peak_memory"] for r in measured],
        "gen tok/s": [r["orchestrator/num_completion_tokens/sum"] / r["orchestrator/time/generate"] for r in measured],
    }
    for header, values in expected.items():
        mean, std = table.mean[header]
        assert mean == pytest.approx(statistics.fmean(values), rel=6e-3), header
        assert std == pytest.approx(statistics.stdev(values), rel=6e-3), header
    # Each step's own cells are its figures (three significant digits).
    assert float(table.steps[1]["gen tok/s"]) == pytest.approx(3424.0 / 80.0, rel=6e-3)
    assert float(table.steps[2]["MFU %"]) == pytest.approx(0.059, rel=6e-3)
    assert float(table.steps[3]["step s"]) == pytest.approx(2.62)
    assert table.notes == []


def test_columns_missing_from_every_row_are_left_out_and_missing_cells_shown_as_dashes():
    rows = [{k: v for k, v in row.items() if not k.startswith("trainer/time/") or k == "trainer/time/step"}
            for row in ROWS]  # fmt: skip
    del rows[3]["trainer/perf/mfu"]  # a row the trainer never reported this figure in
    rows[2]["orchestrator/time/generate"] = 0.0  # no rate from a zero time
    table = parse_bench_table("\n".join(bench_table(rows, RL_BENCH)))
    assert table.headers == ["step s", "trainer tok/s", "MFU %", "peak mem GiB", "gen tok/s", "generate s"]
    assert table.steps[4]["MFU %"] == "-" and table.steps[3]["gen tok/s"] == "-"
    mean, _ = table.mean["MFU %"]
    assert mean == pytest.approx(100 * statistics.fmean([5.9e-4, 5.2e-4]), rel=6e-3)


def test_sft_table_reads_the_sft_figures():
    rows = [{"step": s, "sft/time/step": t, "sft/perf/throughput": tps, "sft/perf/mfu": 0.01 * s,
             "sft/perf/peak_memory": 0.66, "sft/time/forward_backward": t / 2, "sft/progress/loss_tokens": 300.0}
            for s, t, tps in [(1, 20.7, 124.0), (2, 2.4, 1088.0), (3, 2.5, 1040.0)]]  # fmt: skip
    table = parse_bench_table("\n".join(bench_table(rows, SFT_BENCH)))
    assert table.headers == ["step s", "trainer tok/s", "MFU %", "peak mem GiB", "fwd+bwd s"]
    assert table.mean["trainer tok/s"] == pytest.approx((1064.0, statistics.stdev([1088.0, 1040.0])), rel=6e-3)
    assert table.mean["peak mem GiB"] == (0.66, 0.0)


def test_a_single_step_is_summarised_alone_and_no_step_gets_a_message():
    table = parse_bench_table("\n".join(bench_table(ROWS[:1], RL_BENCH)))
    assert "warm-up step alone" in table.title
    assert table.mean["step s"] == (75.5, 0.0)
    assert bench_table([], RL_BENCH) == ["rlbus rl bench: no step finished, so there are no figures (see the logs)"]


def test_steps_without_loss_tokens_get_a_note():
    rows = [{**row, "trainer/progress/loss_tokens": 0.0} for row in ROWS]
    rows[0]["trainer/progress/loss_tokens"] = 12.0  # the warm-up step does not count
    [note] = parse_bench_table("\n".join(bench_table(rows, RL_BENCH))).notes
    assert note.startswith("note: the trainer had no loss tokens")


def test_printed_table_goes_to_the_output_and_the_log_file_only():
    out, messages = io.StringIO(), []
    handler = logger.add(messages.append, format="{extra} {message}")
    try:
        print_bench_table(ROWS, RL_BENCH, out)
    finally:
        logger.remove(handler)
    assert out.getvalue() == "\n".join(bench_table(ROWS, RL_BENCH)) + "\n"
    [message] = messages
    assert "'file_only': True" in message and "rlbus rl bench: 4 steps" in message


def test_bench_steps_are_five_or_fewer_when_max_steps_says_so():
    assert [bench_steps(n) for n in (None, 2, 5, 45)] == [5, 2, 5, 5]
