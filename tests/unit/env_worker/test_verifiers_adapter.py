"""A tiny environment written for verifiers 0.3.x runs through the adapter, token-in/token-out.

verifiers is never installed into the test interpreter's environment: it goes
into a ``--target`` folder (``RLBUS_TEST_VERIFIERS_DIR``, by default one under
the temp dir that later runs reuse), and the environment runs in a subprocess
that appends that folder to ``sys.path``. ``datasets`` is pinned below 5:
``datasets`` 5.2 with ``pyarrow`` 26 cannot fingerprint a dataset here
(dill fails on pyarrow's ``MonthDayNano``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
REQUIREMENTS = ["verifiers==0.3.1", "datasets<5", "pyarrow<22"]

VF_ENV = """
import verifiers as vf
from datasets import Dataset


def load_environment(num_examples: int = 4, multi_turn: bool = False):
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}"}], "answer": str(i)} for i in range(num_examples)]
    parser = vf.Parser()

    def exact(completion, answer, **kwargs) -> float:
        return float((parser.parse_answer(completion) or "").strip() == answer)

    def length(completion, **kwargs) -> float:
        return float(len(parser.parse_answer(completion) or ""))

    rubric = vf.Rubric(funcs=[exact, length], weights=[1.0, 0.0], parser=parser)
    if not multi_turn:
        return vf.SingleTurnEnv(dataset=Dataset.from_list(rows), parser=parser, rubric=rubric)

    class Again(vf.MultiTurnEnv):
        async def env_response(self, messages, state, **kwargs):
            return [vf.UserMessage(content="Again.")]

    return Again(dataset=Dataset.from_list(rows), parser=parser, rubric=rubric, max_turns=3)
"""

# Runs in the subprocess: scripted answers ("2"), the tiny model's real tokenizer.
DRIVER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])  # 0.3.1 ahead of the venv's 0.4
from rlbus.messages import RolloutTask, SamplingParams
from rlbus.environments import load_environment
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.tokens import HFChatTokenizer, TurnRenderer
from rlbus.services.models.tokenizer import build_tokenizer
from tests.unit.env_worker.conftest import ScriptedSampler

tokenizer = build_tokenizer()
out = {}
for multi_turn in (False, True):
    env = load_environment("verifiers:tiny-vf-env", {"multi_turn": multi_turn})
    sampler = ScriptedSampler(tokenizer, lambda prompt, seed: "2")
    runner = RolloutRunner(sampler, TurnRenderer(HFChatTokenizer(tokenizer)), 60)
    task = RolloutTask(task_id="t", env_id="verifiers:tiny-vf-env", example_id=2, num_rollouts=2,
                       sampling=SamplingParams(), lease_s=60, issued_at=time.time())
    rollouts = asyncio.run(runner.run_task(task, env))
    out[str(multi_turn)] = {
        "num_examples": env.num_examples,
        "example": env.example(2),
        "prompts": sampler.prompts,
        "rollouts": [{"reward": r.reward, "error": r.error, "breakdown": r.reward_breakdown, "metrics": r.metrics,
                      "turns": [[t.prompt_ids, t.completion_ids, len(t.completion_logprobs)] for t in r.turns]}
                     for r in rollouts],
        "segments": [tokenizer.decode(t.prompt_ids) for t in rollouts[0].turns[1:]],
    }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def verifiers_dir() -> Path:
    folder = Path(os.environ.get("RLBUS_TEST_VERIFIERS_DIR", Path(tempfile.gettempdir()) / "rlbus-verifiers-0.3.1"))
    if not folder.exists():
        partial = folder.with_name(folder.name + ".partial")
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(partial), *REQUIREMENTS],
                                 check=False, capture_output=True, text=True, timeout=1800)  # fmt: skip
        if install.returncode != 0:
            pytest.skip(f"cannot install {REQUIREMENTS} into {partial}: {install.stderr[-500:]}")
        partial.rename(folder)
    return folder


@pytest.mark.slow
def test_a_verifiers_environment_runs_single_and_multi_turn(verifiers_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny_vf_env.py").write_text(textwrap.dedent(VF_ENV))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(verifiers_dir), str(tmp_path)], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    single, multi = result["False"], result["True"]
    assert single["num_examples"] == 4 and single["example"]["answer"] == "2"
    for run, num_turns in ((single, 1), (multi, 3)):
        for rollout in run["rollouts"]:
            assert rollout["error"] is None
            assert rollout["reward"] == 1.0 and rollout["breakdown"] == {"exact": 1.0}
            assert rollout["metrics"]["length"] == 1.0 and len(rollout["turns"]) == num_turns
            assert all(num_logprobs == len(completion) for _, completion, num_logprobs in rollout["turns"])
    # Multi-turn: each request was exactly the earlier tokens plus the new segment.
    for rollout in multi["rollouts"]:
        sequence: list[int] = []
        for prompt_ids, completion_ids, _ in rollout["turns"]:
            sequence += prompt_ids
            assert sequence in multi["prompts"]
            sequence += completion_ids
    assert multi["segments"] == ["\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"] * 2


def test_without_verifiers_the_error_says_what_to_install() -> None:
    try:
        import verifiers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("verifiers is installed here")
    from rlbus.environments import load_environment

    with pytest.raises(ValueError, match=r"needs the verifiers library: pip install 'rlbus\[verifiers\]'"):
        load_environment("verifiers:anything", {})
