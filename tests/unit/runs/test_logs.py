"""Which files ``rlbus logs --service NAME`` shows, in the layouts runs really leave in ``logs/``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from rlbus.services.runs.logs import Printer, known_services, service_logs

LOCAL = ["console.out", "rl.log", "monitor.log", "orchestrator.log", "orchestrator.out", "trainer.log",
         "trainer/rank_0.log", "trainer/rank_1.log", "trainer.out", "inference.log", "inference.out", "env-worker.log",
         "env-worker-0.out", "env-worker-1.out"]  # fmt: skip
"""A local run with 2 env-workers and 2 trainer ranks: every env-worker appends to env-worker.log."""
SLURM_NODE_LOGS_ELSEWHERE = ["console.out", "rl.log", "monitor.out", "inference-0.out", "inference-1.out",
                             "env-worker-0.out", "env-worker-1.out", "env-worker-10.out"]  # fmt: skip
"""A SLURM run whose nodes keep the service logs: only the consoles streamed back to this host."""


def logs_dir(tmp_path: Path, names: list[str]) -> Path:
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"from {name}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("layout", "service", "expected"),
    [
        (LOCAL, "env-worker", ["env-worker.log"]),
        (LOCAL, "env_worker", ["env-worker.log"]),
        (LOCAL, "env-worker-1", ["env-worker-1.out"]),
        (LOCAL, "trainer", ["trainer.log", "trainer/rank_0.log", "trainer/rank_1.log"]),
        (LOCAL, "trainer-rank1", ["trainer/rank_1.log"]),
        (LOCAL, "rl", ["rl.log"]),
        (LOCAL, "console", []),
        (LOCAL, "inference-0", []),
        (SLURM_NODE_LOGS_ELSEWHERE, "env-worker", ["env-worker-0.out", "env-worker-1.out", "env-worker-10.out"]),
        (SLURM_NODE_LOGS_ELSEWHERE, "inference_1", ["inference-1.out"]),
        (SLURM_NODE_LOGS_ELSEWHERE, "monitor", ["monitor.out"]),
    ],
)
def test_a_service_name_picks_its_files(tmp_path, layout, service, expected):
    found = service_logs(logs_dir(tmp_path, layout), service)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == expected


def test_known_services_are_services_and_single_processes(tmp_path):
    known = known_services(logs_dir(tmp_path, SLURM_NODE_LOGS_ELSEWHERE))
    assert known == ["env-worker", "env-worker-0", "env-worker-1", "env-worker-10", "inference", "inference-0",
                     "inference-1", "monitor", "rl"]  # fmt: skip
    assert known_services(tmp_path / "missing") == []


def test_several_files_get_a_header_each_time_the_output_moves(tmp_path):
    first, second = tmp_path / "a.out", tmp_path / "b.out"
    first.write_text("a1\na2\n")
    out = io.StringIO()
    printer = Printer(out)
    printer.print_start([first], None)
    assert out.getvalue() == "a1\na2\n"  # one file: as it is
    second.write_bytes("b1 é".encode()[:-1])  # a character cut in two by the writer
    printer.print_new([first, second])
    with first.open("a") as handle:
        handle.write("a3\n")
    second.write_bytes("b1 é\n".encode())
    printer.print_new([first, second])
    assert out.getvalue() == f"a1\na2\n\n==> {second} <==\nb1 \n==> {first} <==\na3\n\n==> {second} <==\né\n"


def test_the_last_lines_of_each_file(tmp_path):
    paths = [tmp_path / "a.out", tmp_path / "b.out"]
    for path in paths:
        path.write_text("1\n2\n3\n")
    out = io.StringIO()
    Printer(out).print_start(paths, 1)
    assert out.getvalue() == f"==> {paths[0]} <==\n3\n\n==> {paths[1]} <==\n3\n"
