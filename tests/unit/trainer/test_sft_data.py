"""SFT examples: forms, loss masks, chat templates with tools, packing, files."""

import json

import numpy as np
import pytest

from rlbus.services.trainer.data import reverse_text
from rlbus.services.trainer.data.loading import read_rows
from rlbus.services.trainer.model import load_tokenizer
from rlbus.services.trainer.sft_config import SftDataConfig
from rlbus.services.trainer.sft_data import Sample, SampleBuilder, pack, split_for_ranks


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def builder(tokenizer, **data) -> SampleBuilder:
    return SampleBuilder(tokenizer, SftDataConfig(path="unused.jsonl", **data), max_tokens=4096)


def trained_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m])


def test_reverse_text_set_is_seeded_and_matches_the_environment():
    from rlbus.environments.builtin.reverse_text import lcs_reward, load_environment

    examples = reverse_text.generate(50, seed=3)
    assert examples == reverse_text.generate(50, seed=3) != reverse_text.generate(50, seed=4)
    example = examples[0]
    text = example["prompt"][1]["content"]
    answer = example["completion"][0]["content"]
    assert answer == f"<reversed_text>\n{text[::-1]}\n</reversed_text>"
    # Prompted exactly as the environment prompts, and its answer earns the full reward.
    environment = load_environment(num_examples=1)
    env_prompt = environment.prompt_messages({"prompt": text})
    assert example["prompt"] == env_prompt
    assert lcs_reward(answer, text[::-1]) == 1.0
    assert len({e["prompt"][1]["content"] for e in examples}) > 40


def test_prompt_completion_trains_only_the_completion(tokenizer):
    example = reverse_text.make_example("hello world")
    sample = builder(tokenizer).build(example)
    full = tokenizer.decode(sample.input_ids)
    assert full.endswith("<|im_start|>assistant\n<reversed_text>\ndlrow olleh\n</reversed_text><|im_end|>\n")
    # The turn header is prompt; the answer and its end-of-turn are trained.
    assert trained_text(tokenizer, sample) == "<reversed_text>\ndlrow olleh\n</reversed_text><|im_end|>\n"


def test_messages_win_and_roles_are_configurable(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]  # fmt: skip
    row = {"messages": messages, "prompt": "ignored", "completion": "ignored"}
    sample = builder(tokenizer).build(row)
    assert "ignored" not in tokenizer.decode(sample.input_ids)
    assert trained_text(tokenizer, sample) == "A1<|im_end|>\nA2<|im_end|>\n"
    both = builder(tokenizer, train_on_roles=["assistant", "user"]).build(row)
    # A trained user turn is trained whole, header included (token 0 never is: nothing predicts it).
    expected = "user\nhi<|im_end|>\nA1<|im_end|>\n<|im_start|>user\nagain<|im_end|>\nA2<|im_end|>\n"
    assert trained_text(tokenizer, both) == expected


def test_plain_text_completion_gets_eos(tokenizer):
    sample = builder(tokenizer).build({"prompt": "2+2=", "completion": "4"})
    assert tokenizer.decode(sample.input_ids) == "2+2=4<|im_end|>"
    assert trained_text(tokenizer, sample) == "4<|im_end|>"


def test_tools_column_reaches_the_chat_template(tokenizer):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "find x"}, {"role": "assistant", "content": "done"}]
    for tools in ([tool], json.dumps([tool])):
        sample = builder(tokenizer).build({"messages": messages, "tools": tools})
        text = tokenizer.decode(sample.input_ids)
        assert "<tools>" in text and '"name": "lookup"' in text
        assert trained_text(tokenizer, sample) == "done<|im_end|>\n"


def test_long_examples_are_truncated_and_first_token_untrained(tokenizer):
    short = SampleBuilder(tokenizer, SftDataConfig(path="x.jsonl"), max_tokens=10)
    sample = short.build({"prompt": "", "completion": "abcdefghijklmnop"})
    assert len(sample.input_ids) == 10 and short.num_truncated == 1
    assert sample.loss_mask[0] is False and all(sample.loss_mask[1:])


def test_pack_first_fit_decreasing_and_rank_split():
    samples = [Sample(list(range(n)), [False] + [True] * (n - 1)) for n in (7, 3, 5, 2, 6)]
    rows = pack(samples, seq_len=10)
    assert [r.input_ids.size for r in rows] == [10, 8, 5]  # 7+3, 6+2, 5: longest first, first row with room
    assert sum(r.input_ids.size for r in rows) == 23
    for row in rows:
        starts = np.flatnonzero(row.position_ids == 0)
        assert not row.loss_mask[starts].any()
    shares = split_for_ranks(rows, world_size=2, pad_id=0)
    # Rows go, longest first, to the rank with fewest tokens and room (2 rows each): 10 | 8, 5 | padding.
    assert [[r.input_ids.size for r in share] for share in shares] == [[10, 1], [8, 5]]
    padding = shares[0][-1]
    assert padding.input_ids.size == 1 and not padding.loss_mask.any()


def test_reads_jsonl_and_reports_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert read_rows(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2 is a list, expected a JSON object"):
        read_rows(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_reads_parquet_and_saved_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "data.parquet")
    assert read_rows(tmp_path / "data.parquet") == rows
    # The layout datasets.save_to_disk writes: Arrow stream files listed in state.json, per split.
    split = tmp_path / "saved" / "train"
    split.mkdir(parents=True)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert read_rows(tmp_path / "saved") == rows
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        read_rows(tmp_path / "saved", split="test")
