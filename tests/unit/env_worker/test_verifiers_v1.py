"""verifiers 0.4 (v1) environments run through the rlbus client, token-in/token-out.

verifiers 0.4 is in the test venv (the ``verifiers`` extra, installed by
scripts/setup_env.sh next to vLLM); the driver runs in a subprocess of the same
interpreter, as an env-worker would. The environments are small v1 tasksets written below and
run unchanged by verifiers: its ``SingleAgentEnv`` or an ``Env`` subclass, the
bundled ``null`` harness as a real subprocess (a PEP 723 program that ``uv``
syncs from PyPI on first use), the interception server, ``@vf.reward`` and
``record_reward`` judges. Only the model is scripted ("2").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
REQUIREMENTS = ["verifiers==0.4.0", "uv", "pytest"]

TASKSETS = {
    "tiny_v1_echo.py": """
        import verifiers.v1 as vf

        class EchoData(vf.TaskData):
            answer: str

        class EchoTask(vf.Task[EchoData, vf.State, vf.TaskConfig]):
            @vf.reward(weight=1.0)
            async def exact(self, trace: vf.Trace) -> float:
                return float(trace.last_reply == self.data.answer)

            @vf.metric
            async def reply_length(self, trace: vf.Trace) -> float:
                return float(len(trace.last_reply))

        class EchoTaskset(vf.Taskset[EchoTask, vf.TasksetConfig]):
            def load(self):
                for i in range(4):
                    yield EchoTask(EchoData(prompt=f"Say {i}", answer=str(i)), self.config.task)

        __all__ = ["EchoTaskset"]
    """,
    # Multi-turn: the env answers "Again." twice, as TextArena's env steps its game.
    "tiny_v1_again.py": """
        import verifiers.v1 as vf
        from tiny_v1_echo import EchoTaskset

        class AgainConfig(vf.EnvConfig):
            player: vf.AgentConfig = vf.AgentConfig()

        class AgainEnv(vf.Env[AgainConfig]):
            async def run(self, task, agents):
                async with agents.player.interaction(task) as interaction:
                    segment = await interaction.turn()
                    for _ in range(2):
                        segment = await interaction.turn("Again.")
                interaction.trace.record_reward("said_two", float(segment.last_reply == "2"), 0.5)

        class AgainTaskset(EchoTaskset):
            pass

        __all__ = ["AgainEnv", "AgainTaskset"]
    """,
    # Two separate conversations in one episode: two token sequences that no single one holds.
    "tiny_v1_twice.py": """
        import verifiers.v1 as vf
        from tiny_v1_again import AgainConfig, AgainTaskset

        class TwiceEnv(vf.Env[AgainConfig]):
            async def run(self, task, agents):
                for _ in range(2):
                    async with agents.player.interaction(task) as interaction:
                        await interaction.turn()

        class TwiceTaskset(AgainTaskset):
            pass

        __all__ = ["TwiceEnv", "TwiceTaskset"]
    """,
}

DRIVER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
from rlbus.messages import RolloutTask, SamplingParams
from rlbus.environments import load_environment
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.tokens import HFChatTokenizer, TurnRenderer
from rlbus.services.models.tokenizer import build_tokenizer
from tests.unit.env_worker.conftest import ScriptedSampler

tokenizer = build_tokenizer()

async def run(env_id, args):
    env = load_environment(env_id, args)
    sampler = ScriptedSampler(tokenizer, lambda prompt, seed: "2")
    runner = RolloutRunner(sampler, TurnRenderer(HFChatTokenizer(tokenizer)), 300, transcripts={})
    task = RolloutTask(task_id="t", env_id=env_id, example_id=2, num_rollouts=2, sampling=SamplingParams(),
                       lease_s=60, issued_at=time.time())
    rollouts = await runner.run_task(task, env)
    await env.close()
    return {
        "num_examples": env.num_examples, "example": env.example(2), "prompts": sampler.prompts,
        "rollouts": [{"reward": r.reward, "error": r.error, "breakdown": r.reward_breakdown, "metrics": r.metrics,
                      "text": r.completion_text,
                      "turns": [[t.prompt_ids, t.completion_ids, len(t.completion_logprobs), t.policy_step,
                                 t.starts_sequence, t.completion_mask] for t in r.turns]} for r in rollouts],
        "segments": [tokenizer.decode(t.prompt_ids) for t in rollouts[0].turns[1:]],
        "transcripts": {key: [t.messages, t.tools] for key, t in runner.transcripts.items()},
    }

async def main():
    out = {}
    out["echo"] = await run("verifiers:tiny-v1-echo", {"agent": {"harness": {"id": "null"}}})
    for name in ("again", "twice"):
        out[name] = await run(f"verifiers:tiny-v1-{name}", {"player": {"harness": {"id": "null"}}})
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def verifiers_python() -> Path:
    """This interpreter, which must hold verifiers 0.4 (the ``verifiers`` extra)."""
    pytest.importorskip("verifiers.v1", reason="needs verifiers 0.4: pip install -e '.[verifiers]'")
    return Path(sys.executable)


@pytest.mark.slow
def test_verifiers_v1_environments_run_token_in_token_out(verifiers_python: Path, tmp_path: Path) -> None:
    for name, source in TASKSETS.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    # The harness syncs its program with uv, which the venv's bin folder holds.
    env = {**os.environ, "PATH": f"{verifiers_python.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(verifiers_python), "-c", DRIVER, str(REPO), str(tmp_path)], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    echo, again, twice = result["echo"], result["again"], result["twice"]
    assert echo["num_examples"] == 4 and echo["example"]["answer"] == "2"
    for rollout in echo["rollouts"]:
        assert rollout["error"] is None, rollout["error"]
        assert rollout["reward"] == 1.0 and rollout["breakdown"] == {"exact": 1.0}
        assert rollout["metrics"]["reply_length"] == 1.0 and len(rollout["turns"]) == 1
        assert rollout["turns"][0][3] == 3  # the sampler's policy step
    for rollout in again["rollouts"]:
        assert rollout["error"] is None, rollout["error"]
        assert rollout["reward"] == 1.5 and rollout["breakdown"] == {"exact": 1.0, "said_two": 1.0}
        assert len(rollout["turns"]) == 3
        assert all(num_logprobs == len(completion) for _, completion, num_logprobs, *_ in rollout["turns"])
        # Each request was exactly the earlier tokens plus the new segment.
        sequence: list[int] = []
        for prompt_ids, completion_ids, *_ in rollout["turns"]:
            sequence += prompt_ids
            assert sequence in again["prompts"]
            sequence += completion_ids
    assert again["segments"] == ["\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"] * 2
    # Two conversations in one episode: two token sequences of one rollout, each a full prompt that was
    # sampled as it is, the second marked as a sequence of its own (trained as a sample of its own).
    for rollout in twice["rollouts"]:
        assert rollout["error"] is None and rollout["metrics"]["num_branches"] == 2, rollout
        assert [t[4] for t in rollout["turns"]] == [False, True] and all(all(t[5]) for t in rollout["turns"])
        assert all(prompt_ids in twice["prompts"] for prompt_ids, *_ in rollout["turns"])
    # Kept for rlbus synthesize: each good rollout's conversation as the model saw it, with the last reply.
    assert sorted(again["transcripts"]) == ["t/0", "t/1"] and twice["transcripts"] == {}
    messages, tools = again["transcripts"]["t/1"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Say 2"), ("assistant", "2"), ("user", "Again."), ("assistant", "2"), ("user", "Again."),
        ("assistant", "2"),
    ]  # fmt: skip
    assert tools == []


def test_dotted_args_become_nested_tables_of_the_v1_env_config() -> None:
    from rlbus.services.env_worker.verifiers_v1 import nested_args

    args = {"num_examples": 8, "taskset.game": "Hangman-v0", "player.harness.id": "null",
            "player": {"harness": {"env": {"A": "1"}}}}  # fmt: skip
    assert nested_args(args) == {
        "num_examples": 8, "taskset": {"game": "Hangman-v0"},
        "player": {"harness": {"id": "null", "env": {"A": "1"}}},
    }  # fmt: skip
    for clash in ({"player": "x", "player.harness.id": "null"}, {"player.harness": "x", "player": {"harness": {}}}):
        with pytest.raises(ValueError, match="other args set already"):
            nested_args(clash)
