"""The loop of ``rlbus synthesize`` without a server: the env-worker's runner on a scripted sampler,
the tiny model's real tokenizer, real environments and real files; and the rows it writes as
``rlbus sft`` reads them (tool calls included)."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from rlbus.environments import load_environment
from rlbus.messages import Rollout
from rlbus.services.env_worker.rollout import RolloutRunner, Transcript
from rlbus.services.env_worker.tokens import HFChatTokenizer, TurnRenderer
from rlbus.services.synthesize.config import SynthesizeConfig
from rlbus.services.synthesize.dataset import Dataset
from rlbus.services.synthesize.run import Group, Synthesizer, group_seed, origin, plan, progress_shown
from rlbus.services.trainer.data.loading import read_rows
from rlbus.services.trainer.sft_config import SftDataConfig
from rlbus.services.trainer.sft_data import SampleBuilder
from tests.unit.env_worker.conftest import ScriptedSampler


def config(tmp_path: Path, envs: list[dict], **values: Any) -> SynthesizeConfig:
    return SynthesizeConfig(env=envs, output=tmp_path / "out.jsonl", **values)


def calculator_reply(tokenizer: Any):
    """Calls the calculator on the question, then answers with what the tool said."""

    def reply(prompt: list[int], seed: int | None) -> str:
        seen = tokenizer.decode(prompt)
        if "<|im_start|>tool" not in seen:
            expression = seen.split("What is ")[-1].split("?")[0]
            return f'<tool_call>\n{{"name": "calculate", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'
        return f"<answer>{seen.split('<|im_start|>tool')[-1].split('<|im_end|>')[0].strip()}</answer>"

    return reply


def run(cfg: SynthesizeConfig, runner: RolloutRunner, model: str = "tiny") -> tuple[Synthesizer, Dataset]:
    async def go() -> tuple[Synthesizer, Dataset]:
        dataset = Dataset(cfg.output_path, cfg.rejects_path, cfg.min_reward).open()
        try:
            groups = plan(cfg, [load_environment(spec.id, spec.args) for spec in cfg.env], dataset, model)
            synthesizer = Synthesizer(cfg, runner, dataset, model)
            await synthesizer.run(groups, tqdm(disable=True))
        finally:
            dataset.close()
        return synthesizer, dataset

    return asyncio.run(go())


def test_tool_rollouts_become_rows_that_sft_trains_on_the_model_turns(tmp_path, tokenizer):
    cfg = config(tmp_path, [{"id": "calculator", "args": {"num_examples": 3}}], rollouts_per_example=2)
    runner = RolloutRunner(ScriptedSampler(tokenizer, calculator_reply(tokenizer)),
                           TurnRenderer(HFChatTokenizer(tokenizer)), 30, transcripts={})  # fmt: skip
    synthesizer, _ = run(cfg, runner)
    assert synthesizer.tally.accepted == 6 and synthesizer.tally.errored == 0 and runner.transcripts == {}
    rows = read_rows(cfg.output_path)  # what `rlbus sft` reads
    assert sorted((r["example_id"], r["rollout_index"]) for r in rows) == [(e, i) for e in range(3) for i in range(2)]
    env = load_environment("calculator", {"num_examples": 3})
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
        assert row["tools"] == env.tools and row["reward"] == 1.0 and row["metrics"]["num_tool_calls"] == 1.0
        assert row["messages"][2]["tool_calls"][0]["function"]["name"] == "calculate"
        assert row["messages"][4]["content"] == f"<answer>{env.example(row['example_id'])['answer']}</answer>"
    pieces = SampleBuilder(tokenizer, SftDataConfig(path=str(cfg.output_path)), 2048).pieces(rows[0])
    trained = "".join(text for text, is_trained in pieces if is_trained)
    assert trained.startswith('<tool_call>\n{"name": "calculate"') and trained.endswith("</answer><|im_end|>\n")
    assert "<|im_start|>tool" not in trained and "What is" not in trained  # the prompt and tool output are not


def test_only_missing_rollouts_are_run_and_written(tmp_path, tokenizer):
    cfg = config(tmp_path, [{"id": "reverse-text", "args": {"num_examples": 4}}], num_examples=3,
                 rollouts_per_example=2, min_reward=0.5)  # fmt: skip
    rejects = Dataset(cfg.output_path, cfg.rejects_path, cfg.min_reward).open()
    spec = cfg.env[0]
    done = [origin(cfg, spec, 0, 0, "tiny"), origin(cfg, spec, 0, 1, "tiny"), origin(cfg, spec, 2, 1, "tiny")]
    for row_origin in done:
        rejects.rejected.append(row_origin.key, asdict(row_origin))
    rejects.close()
    sampler = ScriptedSampler(tokenizer, lambda prompt, seed: "<reversed_text>x</reversed_text>")
    runner = RolloutRunner(sampler, TurnRenderer(HFChatTokenizer(tokenizer)), 30, transcripts={})
    synthesizer, _ = run(cfg, runner)
    # Example 0 is done; example 1 runs whole; example 2 runs and writes only its rollout 0.
    assert len(sampler.prompts) == 2 * 2
    rows = [json.loads(line) for line in cfg.rejects_path.read_text().splitlines()[3:]]
    assert sorted((r["example_id"], r["rollout_index"]) for r in rows) == [(1, 0), (1, 1), (2, 0)]
    assert synthesizer.tally.rejected == 3 and not cfg.output_path.read_text()


def test_errored_rollouts_are_counted_and_not_written(tmp_path):
    cfg = config(tmp_path, [{"id": "reverse-text", "args": {"num_examples": 2}}], rollouts_per_example=3)
    dataset = Dataset(cfg.output_path, cfg.rejects_path, None).open()
    synthesizer = Synthesizer(cfg, RolloutRunner(None, None, 1, transcripts={}), dataset, "tiny")  # type: ignore[arg-type]
    env = load_environment("reverse-text", {"num_examples": 2})
    group = Group(0, cfg.env[0], env, 1, pending=[0, 1, 2])
    rollouts = [
        Rollout(rollout_id="t/0", turns=[], reward=0.0, error="the server answered 500"),
        Rollout(rollout_id="t/1", turns=[], reward=0.5),  # no conversation kept for it
        Rollout(rollout_id="t/2", turns=[], reward=1.0),
    ]
    synthesizer.transcripts["t/2"] = Transcript(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]
    )
    synthesizer.record(group, rollouts)
    dataset.close()
    assert synthesizer.tally.errored == 2 and synthesizer.tally.accepted == 1 and synthesizer.transcripts == {}
    assert synthesizer.tally.errors == [
        "reverse-text example 1 rollout 0: the server answered 500",
        "reverse-text example 1 rollout 1: the environment recorded no conversation",
    ]
    (row,) = read_rows(cfg.output_path)
    assert row["rollout_index"] == 2 and row["reward"] == 1.0


def test_more_examples_than_an_environment_has_roll_out_all_of_them(tmp_path, caplog_loguru):
    cfg = config(tmp_path, [{"id": "reverse-text", "args": {"num_examples": 2}}], num_examples=5)
    dataset = Dataset(cfg.output_path, cfg.rejects_path, None).open()
    groups = plan(cfg, [load_environment("reverse-text", {"num_examples": 2})], dataset, "tiny")
    dataset.close()
    assert [g.example_id for g in groups] == [0, 1]
    assert "has 2 examples, fewer than num_examples = 5" in caplog_loguru.text


def test_each_example_has_its_own_stable_seed(tmp_path):
    cfg = config(tmp_path, [{"id": "reverse-text"}, {"id": "reverse-text", "args": {"seed": 1}}])
    seeds = {group_seed(s, spec, e) for s in (0, 1) for spec in cfg.env for e in range(50)}
    assert len(seeds) == 200 and max(seeds) < 2**30
    assert group_seed(0, cfg.env[0], 7) == group_seed(0, cfg.env[0], 7)


@pytest.mark.parametrize(("progress", "tty", "shown"), [(True, True, True), (True, False, False), (False, True, False)])
def test_the_bar_is_drawn_on_a_terminal_unless_turned_off(tmp_path, progress, tty, shown):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert progress_shown(config(tmp_path, [{"id": "reverse-text"}], progress=progress), Stream()) is shown
