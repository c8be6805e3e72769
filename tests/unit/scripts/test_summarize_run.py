"""scripts/summarize_run.py: the quickstart's closing summary, from a run's metrics.jsonl."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("summarize_run", ROOT / "scripts" / "summarize_run.py")
summarize_run = importlib.util.module_from_spec(spec)
sys.modules["summarize_run"] = summarize_run  # dataclasses look their module up there
spec.loader.exec_module(summarize_run)


def write_run(folder: Path, rewards: list[float]) -> None:
    lines = []
    for step, reward in enumerate(rewards, start=1):
        lines.append({"step": step, "service": "orchestrator", "replica_id": "o", "reward/all/mean": reward})
        lines.append({"step": step, "service": "trainer", "replica_id": "t-rank0", "mismatch_kl/mean": 1e-6 * step,
                      "time/step": 2.0})  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines)
    # A restarted orchestrator reports step 1 again (the last line wins); a killed run leaves half a line.
    text += "\n" + json.dumps({"step": 1, "service": "orchestrator", "replica_id": "o", "reward/all/mean": 0.0})
    (folder / "metrics.jsonl").write_text(text + '\n{"step": 9, "serv')


def test_summary_reads_first_and_last_rewards_kl_and_phases(tmp_path, capsys):
    write_run(tmp_path, [0.3, 0.2, 0.4, 0.5, 0.9, 0.8])
    code = summarize_run.main([str(tmp_path), "--window", "2", "--phase", "install=5", "--phase", "rl=100", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_steps"] == 6 and summary["reward_first"] == 0.1 and round(summary["reward_last"], 9) == 0.85
    assert abs(summary["reward_gain"] - 0.75) < 1e-9 and abs(summary["mismatch_kl"] - 3.5e-6) < 1e-12
    assert summary["phases_s"] == {"install": 5.0, "rl": 100.0}


def test_text_summary_shows_wall_time_with_and_without_install(tmp_path, capsys):
    write_run(tmp_path, [0.3, 0.5])
    assert summarize_run.main([str(tmp_path), "--phase", "install=60", "--phase", "sft=30", "--phase", "rl=90"]) == 0
    out = capsys.readouterr().out
    assert "wall time              180 s (install 60 s, sft 30 s, rl 90 s)" in out
    assert "wall time, no install  120 s" in out and "mismatch KL (mean)     1.50e-06" in out


def test_a_run_without_metrics_is_an_error_naming_the_folder(tmp_path, capsys):
    assert summarize_run.main([str(tmp_path)]) == 2
    assert f"no metrics file at {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err


def test_eval_before_and_after_ends_the_summary_with_samples_and_the_comparison(tmp_path, capsys):
    write_run(tmp_path, [0.3, 0.5, 0.7])
    evals = [{"step": s, "service": "orchestrator", "replica_id": "o", "eval/fl/avg@1": v}
             for s, v in ((0, 0.14), (3, 0.95))]  # fmt: skip
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("\n" + "\n".join(json.dumps(e) for e in evals) + "\n")
    samples = [{"step": s, "prompt": w, "completion": c, "reward": r}
               for s, w, c, r in ((1, "kqzt", "t", 0.0), (3, "kqzt", "k", 1.0))]  # fmt: skip
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"metrics": {"eval/fl/avg@1": 0.2}}))
    assert summarize_run.main([str(tmp_path), "--eval", "fl", "--compare", f"SFT alone={other}",
                               "--compare", f"missing={tmp_path / 'none.json'}"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "eval before 0.140 after 0.950"
    assert "SFT alone: eval 0.200" in lines and "missing: eval n/a" in lines
    assert "samples, first step (1): 'kqzt' -> 't' (0)" in lines
    assert "samples, last step (3): 'kqzt' -> 'k' (1)" in lines


def test_fewer_than_two_evaluations_say_so_on_the_last_line(tmp_path, capsys):
    write_run(tmp_path, [0.3, 0.5])
    assert summarize_run.main([str(tmp_path), "--eval", "fl"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval before n/a after n/a")
