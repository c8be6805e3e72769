"""The dataset files of ``rlbus synthesize``: keys, rows, and reopening after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlbus.errors import UserError
from rlbus.messages import Rollout
from rlbus.services.env_worker.rollout import Transcript
from rlbus.services.synthesize.dataset import Dataset, RowFile, RowOrigin, build_row, key_of_row, row_key

TOOLS = [{"type": "function", "function": {"name": "calculate", "parameters": {"type": "object"}}}]


def origin(example_id: int = 0, index: int = 0, env_args: dict | None = None, seed: int = 0) -> RowOrigin:
    return RowOrigin("calculator", env_args or {"max_turns": 3}, example_id, index, seed, "tiny")


def row(example_id: int = 0, index: int = 0, reward: float = 1.0, tools: list | None = None) -> dict:
    rollout = Rollout(rollout_id="t/0", turns=[], reward=reward, metrics={"num_turns": 2.0}, answer="6")
    messages = [{"role": "user", "content": "What is 2*3?"}, {"role": "assistant", "content": "<answer>6</answer>"}]
    return build_row(origin(example_id, index), rollout, Transcript(messages, tools or []))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_key_names_env_args_example_rollout_and_seed():
    base = origin().key
    assert origin().key == base == key_of_row(row())
    assert row_key("calculator", {"b": 1, "a": 2}, 0, 0, 0) == row_key("calculator", {"a": 2, "b": 1}, 0, 0, 0)
    others = [origin(example_id=1), origin(index=1), origin(seed=1), origin(env_args={"max_turns": 4})]
    assert len({base, *(o.key for o in others)}) == 5
    with pytest.raises(ValueError, match=r"without \['rollout_index', 'seed'\]"):
        key_of_row({"env_id": "x", "env_args": {}, "example_id": 0})


def test_a_row_holds_what_sft_reads_and_where_it_came_from():
    plain, with_tools = row(), row(tools=TOOLS)
    assert "tools" not in plain and with_tools["tools"] == TOOLS
    assert plain["messages"][-1] == {"role": "assistant", "content": "<answer>6</answer>"}
    assert {k: plain[k] for k in ("reward", "metrics", "env_id", "example_id", "rollout_index", "model", "answer")} \
        == {"reward": 1.0, "metrics": {"num_turns": 2.0}, "env_id": "calculator", "example_id": 0,
            "rollout_index": 0, "model": "tiny", "answer": "6"}  # fmt: skip
    json.dumps(with_tools)  # a JSON line as it is


def test_rows_are_appended_and_their_keys_known_when_reopened(tmp_path):
    path = tmp_path / "out.jsonl"
    first = RowFile(path).open()
    for example_id in range(3):
        first.append(origin(example_id).key, row(example_id))
    first.close()
    again = RowFile(path).open()
    assert again.keys == {origin(i).key for i in range(3)} and again.num_rows == 3
    again.append(origin(3).key, row(3))
    again.close()
    assert [r["example_id"] for r in lines(path)] == [0, 1, 2, 3]


def test_a_torn_last_line_is_cut_off_with_a_warning(tmp_path, caplog_loguru):
    path = tmp_path / "out.jsonl"
    whole = json.dumps(row(0)) + "\n"
    path.write_text(whole + json.dumps(row(1))[:57])  # killed mid-write
    reopened = RowFile(path).open()
    assert reopened.keys == {origin(0).key}
    reopened.append(origin(1).key, row(1))
    reopened.close()
    assert [r["example_id"] for r in lines(path)] == [0, 1]
    assert "cut off a partly written last line (57 bytes" in caplog_loguru.text


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path, caplog_loguru):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)))
    reopened = RowFile(path).open()
    assert reopened.keys == {origin(0).key, origin(1).key}
    reopened.append(origin(2).key, row(2))
    reopened.close()
    assert [r["example_id"] for r in lines(path)] == [0, 1, 2]
    assert "kept it" in caplog_loguru.text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"messages": []}\n', r"out.jsonl:1 is not a row of rlbus synthesize \(a row without \['env_id'"),
        ("[1, 2]\n", r"out.jsonl:1 is not a row of rlbus synthesize \(a JSON list, not an object\)"),
        ("\n{not json\n", r"out.jsonl:2 is not a row"),
    ],
)
def test_a_file_this_command_did_not_write_is_refused(tmp_path, text, error):
    path = tmp_path / "out.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=error):
        RowFile(path).open()
    assert path.read_text() == text  # left as it was


def test_a_second_writer_of_the_same_file_is_refused(tmp_path):
    first = RowFile(tmp_path / "out.jsonl").open()
    try:
        with pytest.raises(UserError, match="being written by another rlbus synthesize"):
            RowFile(tmp_path / "out.jsonl").open()
    finally:
        first.close()
    RowFile(tmp_path / "out.jsonl").open().close()  # free again once the first one closed


def test_rows_below_min_reward_go_to_the_rejects_file_and_count_as_done(tmp_path):
    output, rejects = tmp_path / "out.jsonl", tmp_path / "out.rejected.jsonl"
    dataset = Dataset(output, rejects, min_reward=0.5).open()
    assert dataset.add(origin(0).key, row(0, reward=0.9)) is True
    assert dataset.add(origin(1).key, row(1, reward=0.1)) is False
    dataset.close()
    assert [r["example_id"] for r in lines(output)] == [0] and [r["example_id"] for r in lines(rejects)] == [1]
    # A rerun, even without min_reward, does not roll the rejected one out again.
    again = Dataset(output, rejects, min_reward=None).open()
    assert again.is_done(origin(0).key) and again.is_done(origin(1).key) and not again.is_done(origin(2).key)
    assert again.num_done == 2
    again.close()


def test_without_min_reward_no_rejects_file_is_made(tmp_path):
    Dataset(tmp_path / "out.jsonl", tmp_path / "out.rejected.jsonl", min_reward=None).open().close()
    assert (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.rejected.jsonl").exists()
