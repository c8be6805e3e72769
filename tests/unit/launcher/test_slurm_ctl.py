"""Parsing what SLURM's commands answer (formats as printed by slurm-wlm 22.05)."""

from rlbus.services.launcher.slurm_ctl import (
    expand_output_pattern,
    expand_task_ids,
    parse_exit_code,
    parse_node_address,
    parse_queue,
)  # fmt: skip


def test_queue_rows_become_one_state_per_task_including_a_pending_range():
    text = "4_[1-3%2]|4|1-3%2|PENDING|(Dependency)|4\n5_0|5|0|RUNNING|node7|4\n9|9|N/A|COMPLETED|node1|\n"
    tasks = parse_queue(text)
    assert [(t.array_job_id, t.task_id, t.job_id, t.state, t.node) for t in tasks] == [
        ("4", 1, "4", "PENDING", ""), ("4", 2, "4", "PENDING", ""), ("4", 3, "4", "PENDING", ""),
        ("4", 0, "5", "RUNNING", "node7"), ("9", 0, "9", "COMPLETED", "node1"),
    ]  # fmt: skip
    assert not tasks[3].terminal and tasks[4].terminal


def test_task_id_ranges():
    assert expand_task_ids("0-2,5%4") == [0, 1, 2, 5]
    assert expand_task_ids("7") == [7]


def test_exit_code_is_the_code_or_minus_the_signal_and_ignores_derived():
    assert parse_exit_code("JobId=5 DerivedExitCode=0:0 ExitCode=3:0 Foo=bar") == 3
    assert parse_exit_code("JobId=5 ExitCode=0:15") == -15
    assert parse_exit_code("nothing here") is None


def test_node_address_and_output_patterns():
    assert parse_node_address("NodeName=vm Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=vm") == "10.1.2.3"
    path = expand_output_pattern("/tmp/%x-%A_%a-%3a.%j.out%%", "rlbus-run-trainer", "12", 4, "17", "n1")
    assert path == "/tmp/rlbus-run-trainer-12_4-004.17.out%"
