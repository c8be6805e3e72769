"""The end-of-run summary: steps, first and last reward, last evaluation, wall time, where results are."""

import json

from loguru import logger

from rlbus.services.launcher.summary import log_run_summary, run_summary


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def test_summary_of_a_finished_run(tmp_path):
    rewards = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8]
    write_jsonl(tmp_path / "steps.jsonl", [{"step": i + 1, "orchestrator/reward/all/mean": r}
                                           for i, r in enumerate(rewards)], tail='{"step": 8, "orch')  # fmt: skip
    write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 0, "service": "orchestrator", "eval/math/avg@4": 0.25},
        {"step": 5, "service": "orchestrator", "eval/math/avg@4": 0.5, "eval/math/pass@4": 0.75},
        {"step": 7, "service": "trainer", "loss/mean": 0.1},
    ])  # fmt: skip
    for name in ("weights/step_5", "weights/step_7", "weights/step_9.partial", "charts"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "charts" / "reward.html").write_text("<html/>")
    lines = run_summary(tmp_path, wall_time_s=3725.2)
    assert lines[0] == "steps done: 7 (last step 7)"  # the line a crash cut off is skipped
    assert lines[1] == "reward/all/mean: 0.2000 (mean of the first 3 steps) -> 0.7000 (last 3)"
    assert lines[2] == "last eval (policy step 5): eval/math/avg@4 0.5000, eval/math/pass@4 0.7500"
    assert lines[3] == "wall time: 1h02m05s"
    assert lines[4] == f"final weights: {tmp_path / 'weights/step_7'}"
    assert f"steps.jsonl: {tmp_path / 'steps.jsonl'}" in lines
    assert lines[-1] == f"charts: {tmp_path / 'charts/reward.html'}"


def test_a_run_that_wrote_nothing_still_gets_a_summary_at_info(tmp_path):
    messages = []
    handler = logger.add(messages.append, level="INFO", format="{level} {message}")
    try:
        log_run_summary(tmp_path, wall_time_s=4.0)
    finally:
        logger.remove(handler)
    [message] = messages
    assert message.startswith("INFO run summary:")
    for expected in ("steps done: 0", "reward: none reported", "wall time: 0m04s", "final weights: none written",
                     "charts: none written"):  # fmt: skip
        assert expected in message
