"""The front door: each user mistake ends as one line on stderr naming it and its fix, with exit
code 2 (a config mistake, found before start) or 1 (found at run time), no traceback on the
console and nothing started. Every case goes through the real console-script function."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from rlbus.services.cli import main as rlbus
from rlbus.services.run_config import RUN_MARKER
from tests.conftest import free_tcp_port

# Placeholders in the table, filled per test: a model folder the config checks accept (its files are
# never loaded: every case fails before), a plain file, a folder, and fresh paths under tmp_path.
MODEL, FILE, FOLDER, OUT, MISSING, BAD_JSONL, UNRELATED = (
    "<model>", "<file>", "<folder>", "<out>", "<missing>", "<bad-jsonl>", "<unrelated>")

CASES = {
    # a. an output folder that is a file, or that cannot be made
    "output-dir-is-a-file": (["rl", "--model", MODEL, "--output-dir", FILE], 1, "is a file, not a folder"),
    "output-dir-is-a-file-dry-run": (["rl", "--model", MODEL, "--output-dir", FILE, "--dry-run"], 1,
                                     "pick another --output-dir"),
    "output-dir-unwritable": (["rl", "--model", MODEL, "--output-dir", "/proc/rlbus-front-door"], 1,
                              "cannot write to output_dir '/proc/rlbus-front-door'"),
    # b. '@' a folder or a missing file
    "at-a-folder": (["rl", "@", FOLDER], 2, "is a folder: '@' takes a TOML file"),
    "at-a-missing-file": (["rl", "@", MISSING], 2, "does not exist"),
    # c. --slurm without Curve keys; --slurm-cancel of a run never submitted
    "slurm-without-keys": (["rl", "--model", MODEL, "--output-dir", OUT, "--slurm", "--dry-run"], 1,
                           "--slurm needs CurveZMQ keys"),
    "slurm-enabled-without-keys": (["rl", "--model", MODEL, "--output-dir", OUT, "--slurm.enabled"], 1,
                                   "`rlbus keys --out keys`"),
    "slurm-cancel-not-submitted": (["rl", "--model", MODEL, "--output-dir", OUT, "--slurm-cancel"], 1,
                                   "no slurm_jobs.json in"),
    # d. SFT data missing or malformed
    "sft-data-missing": (["sft", "--model", MODEL, "--output-dir", OUT, "--data.path", MISSING], 1,
                         "does not exist: fix data.path"),
    "sft-data-malformed": (["sft", "--model", MODEL, "--output-dir", OUT, "--data.path", BAD_JSONL], 1,
                           "is not valid JSON"),
    # e. a model written over a file
    "model-out-is-a-file": (["model", "tiny", "--out", FILE], 1, "is a file, not a folder: pick another --out"),
    # f. a monitor address zmq cannot take
    "tail-monitor-garbage": (["tail", "--monitor", "garbage"], 1, "'garbage' is not a ZeroMQ address"),
    # g. a misspelt local model folder is never sent to a hub
    "sft-model-misspelt": (["sft", "--model", "./models/tyni", "--output-dir", OUT, "--data.synthetic",
                            "reverse-text"], 1, "no model folder at ./models/tyni"),
    "rl-model-misspelt": (["rl", "--model", "./models/tyni", "--output-dir", OUT], 2, "'./models/tyni': no such folder"),
    # h. an empty output folder means the working directory
    "output-dir-empty": (["rl", "--output-dir", "", "--dry-run"], 2, "output_dir: is empty"),
    # i. --clean-output-dir of a folder rlbus did not make
    "clean-unmarked-folder": (["rl", "--model", MODEL, "--output-dir", UNRELATED, "--clean-output-dir", "--dry-run"],
                              2, f"holds no {RUN_MARKER} marker"),
    # j. sft without data
    "sft-without-data": (["sft", "--output-dir", OUT, "--dry-run"], 2, "no SFT data given: set --data.path"),
    # m. keys through the shared config parser
    "keys-without-out": (["keys"], 2, "out is required: give --out VALUE"),
}


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    unrelated = tmp_path / "someone-elses"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious\n")
    return {MODEL: str(model), FILE: str(tmp_path / "a-file"), FOLDER: str(tmp_path / "a-folder"),
            OUT: str(tmp_path / "out"), MISSING: str(tmp_path / "missing.jsonl"),
            BAD_JSONL: str(tmp_path / "bad.jsonl"), UNRELATED: str(unrelated)}  # fmt: skip


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("RLBUS_")]:  # the CI's own variables must not leak in
        monkeypatch.delenv(name)
    yield
    # The commands point loguru at this test's captured stderr; later tests must not write there.
    logger.remove()
    logger.add(sys.__stderr__)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = rlbus(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_line_and_an_exit_code(name, places, capsys):
    argv, expected_code, needle = CASES[name]
    code, lines = run_cli([places.get(arg, arg) for arg in argv], capsys)
    assert code == expected_code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rlbus {argv[0]}"), lines
    assert needle in lines[0], lines


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a chmod 500 folder")
def test_an_output_folder_without_write_permission(places, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, lines = run_cli(["rl", "--model", places[MODEL], "--output-dir", str(locked / "run")], capsys)
    assert code == 1 and len(lines) == 1 and "Permission denied" in lines[0], lines


def test_eval_exits_1_when_the_endpoint_fails_most_rollouts(tmp_path, capsys):
    # Nothing listens on the port: every rollout errors. (tests/integration/test_eval_command.py
    # covers a working endpoint, which exits 0.)
    env = '[{"id": "reverse-text", "num_examples": 3, "rollouts_per_example": 2}]'
    argv = ["eval", "--output-dir", str(tmp_path), "--eval.env", env, "--client.max-retries", "0",
            "--client.base-url", f"http://127.0.0.1:{free_tcp_port()}/v1"]  # fmt: skip
    code, lines = run_cli(argv, capsys)
    assert code == 1
    assert lines[-1].startswith("rlbus eval: 6 of 6 rollouts of reverse-text errored (100% > max_error_fraction")
    assert (tmp_path / "eval" / "metrics.json").is_file()  # written all the same


def test_nothing_is_cleaned_or_started(places, capsys):
    run_cli(["rl", "--model", places[MODEL], "--output-dir", places[UNRELATED], "--clean-output-dir"], capsys)
    assert (Path(places[UNRELATED]) / "thesis.tex").read_text() == "precious\n"
    run_cli(["rl", "--model", places[MODEL], "--output-dir", places[OUT], "--slurm"], capsys)
    assert not (Path(places[OUT]) / "slurm_jobs.json").exists()


def test_the_traceback_of_a_run_time_mistake_is_in_the_log_file(places, capsys):
    code, _ = run_cli(["sft", "--model", places[MODEL], "--output-dir", places[OUT], "--data.path",
                       places[MISSING]], capsys)  # fmt: skip
    assert code == 1
    log = (Path(places[OUT]) / "logs" / "sft.log").read_text()
    assert "Traceback" in log and "does not exist" in log


def test_a_run_folder_is_marked_and_can_then_be_cleaned(places, capsys):
    out = Path(places[OUT])
    argv = ["rl", "--model", places[MODEL], "--output-dir", str(out), "--dry-run"]
    assert run_cli(argv, capsys)[0] == 0
    assert (out / RUN_MARKER).is_file()
    assert run_cli([*argv, "--clean-output-dir"], capsys)[0] == 0


def test_keys_take_a_config_file_like_every_command(tmp_path, capsys):
    (tmp_path / "keys.toml").write_text(f'out = "{tmp_path / "k"}"\nclients = "a,b"\n')
    assert rlbus(["keys", "@", str(tmp_path / "keys.toml")]) == 0
    assert (tmp_path / "k" / "clients" / "b.key_secret").is_file()


def test_rl_help_and_parser_agree_and_list_shared_fields_once(capsys):
    assert rlbus(["rl", "--help"]) == 0
    text = capsys.readouterr().out
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert "--slurm-cancel" in options and "--slurm" in options
    # A section's copy of a shared field (--trainer.model) is not listed; a key of its own that is also
    # called model (--orchestrator.teacher.client.model) is.
    assert not [o for o in options if o.split(".")[-1] in ("output-dir", "model", "seed") and o.count(".") == 1], options
    # 499 before [orchestrator.teacher] (docs/training.md) added 20; 551 with the thread and executor
    # fields of trainer and inference (README Performance); 20 for GPU placement, trainer ranks and
    # nodes (docs/scaling.md); 11 for LoRA (docs/lora.md); 16 for trainer.memory and trainer.ckpt.format
    # (docs/scaling.md, Memory and Checkpoints); 5 for inference.kv_cache_gib and fork_engine_core
    # (README Performance); 4 for the run's ckpt.format (docs/scaling.md, Checkpoints); 21 for the LoRA
    # adapter transfer (docs/lora.md); 2 for fork_engine_core with cpu_threads_bind; 9 for the shared
    # trainer (bus.endpoints.trainer_runs, trainer.max_concurrent_runs); 9 for the run's [shared_trainer]
    # (docs/lora.md); 2 for inference.await_adapter choosing the adapter a replica follows; 71 for the
    # weight relays (fan-out) and the collective transport of trainer and inference (docs/inference.md,
    # Many replicas and Collective transport); 5 for trainer.run_idle_evict_s (docs/lora.md); 1 for the
    # weight group address rlbus rl sets when unset (docs/inference.md); 3 for fork_engine_core's
    # inductor ISA probe (README Performance); 9 for trainer.compile (README Performance); a section listed
    # twice would add hundreds.
    assert len(text.splitlines()) < 763 + 1
