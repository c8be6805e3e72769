"""Rollouts through the env-worker's code and ``rlbus inference``, against vLLM offline, at the quickstart's shape.

Each round is one quickstart step's worth of generation: 8 reverse-text examples
(1-2 words) x 8 rollouts, temperature 1, at most 64 tokens, logprobs of every token.

(a) vLLM's offline ``LLM.generate`` in one process, each example as one request with
    ``n=8`` (the engine at its best: no HTTP, no chat rendering, no scoring);
(b) the env-worker's own path: ``RolloutRunner`` with the ``InferenceClient`` and
    ``TurnRenderer`` an env-worker uses, against ``rlbus inference`` over HTTP: chat
    rendering through ``/tokenize``, one completion request per group, token-in/
    token-out checks, reward scoring.

Completion tokens/s over ``--rounds`` rounds after one warm-up round each; the last line
is ``rollouts rlbus/offline <ratio>``. The offline engine runs first and is gone before
the service starts, so the two never share the cores.

    python scripts/bench/rollouts.py [--model DIR] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import ENGINE as ENGINE_SETTINGS  # noqa: E402
from inference import ENV, STARTUP_S, Service, stop_session  # noqa: E402

EXAMPLES_PER_ROUND, ROLLOUTS, MAX_TOKENS = 8, 8, 64
ENV_ARGS = {"min_words": 1, "max_words": 2}


def offline_child(model: str, rounds: int) -> None:
    """Runs in its own process: prints ``RESULT <tokens> <seconds>`` of the timed rounds."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from rlbus.environments.builtin.reverse_text import load_environment

    env, tokenizer = load_environment(**ENV_ARGS), AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template(env.prompt_messages(env.example(i)), add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for i in range(EXAMPLES_PER_ROUND * (rounds + 1))]  # fmt: skip
    llm = LLM(model, max_num_seqs=64, seed=0, dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
              enforce_eager=True)  # fmt: skip
    params = SamplingParams(n=ROLLOUTS, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0)
    tokens, seconds = 0, 0.0
    for round_ in range(rounds + 1):  # round 0 warms up
        batch = prompts[round_ * EXAMPLES_PER_ROUND:(round_ + 1) * EXAMPLES_PER_ROUND]
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in batch], params, use_tqdm=False)
        if round_:
            seconds += time.perf_counter() - started
            tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
    sys.stdout.write(f"RESULT {tokens} {seconds}\n")


def run_offline(model: str, rounds: int, log: Path) -> tuple[int, float]:
    argv = [sys.executable, __file__, "--offline-child", "--model", model, "--rounds", str(rounds)]
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=output, env=os.environ | ENV,
                                   start_new_session=True)  # fmt: skip
        try:
            stdout, _ = process.communicate(timeout=STARTUP_S)
        finally:
            stop_session(process)
    result = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
    if not result:
        raise RuntimeError(f"the offline run printed no result; see {log}")
    _, tokens, seconds = result[-1].split()
    return int(tokens), float(seconds)


async def env_worker_rounds(base_url: str, rounds: int) -> tuple[int, float]:
    """The timed rounds through the env-worker's rollout code."""
    from rlbus.environments.builtin.reverse_text import load_environment
    from rlbus.messages import RolloutTask, SamplingParams
    from rlbus.services.env_worker.inference import InferenceClient
    from rlbus.services.env_worker.rollout import RolloutRunner
    from rlbus.services.env_worker.tokens import TurnRenderer

    env = load_environment(**ENV_ARGS)
    client = InferenceClient([base_url])
    runner = RolloutRunner(client, TurnRenderer(client), env_timeout_s=60)
    sampling = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    tokens, seconds = 0, 0.0
    try:
        for round_ in range(rounds + 1):
            tasks = [RolloutTask(task_id=f"r{round_}-{i}", env_id="reverse-text", env_args=ENV_ARGS, example_id=i,
                                 num_rollouts=ROLLOUTS, sampling=sampling, lease_s=60, issued_at=time.time())
                     for i in range(round_ * EXAMPLES_PER_ROUND, (round_ + 1) * EXAMPLES_PER_ROUND)]  # fmt: skip
            started = time.perf_counter()
            groups = await asyncio.gather(*(runner.run_task(task, env) for task in tasks))
            errors = [r.error for group in groups for r in group if r.error]
            if errors:
                raise RuntimeError(f"{len(errors)} rollouts errored, e.g. {errors[0]}")
            if round_:
                seconds += time.perf_counter() - started
                tokens += sum(len(t.completion_ids) for group in groups for r in group for t in r.turns)
    finally:
        await client.close()
    return tokens, seconds


def quickstart_tiny_model(out: Path) -> str:
    root = Path(__file__).resolve().parents[2]
    config = root / "configs" / "quickstart" / "model.toml"
    subprocess.run([sys.executable, "-m", "rlbus", "model", "tiny", "@", str(config), "--out", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the quickstart's untrained tiny model)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (one warm-up round comes first)")
    parser.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_child:
        offline_child(args.model, args.rounds)
        return
    from rlbus.logging import setup_logging

    setup_logging("bench", None, level="warning")
    with tempfile.TemporaryDirectory(prefix="bench-rollouts-") as name:
        workdir = Path(name)
        model = args.model or quickstart_tiny_model(workdir / "model")
        offline = run_offline(model, args.rounds, workdir / "offline.log")
        # The quickstart's engine settings: its model has 512 positions.
        service = Service(model, workdir, max_num_seqs=64, engine={**ENGINE_SETTINGS, "max_model_len": 512})
        try:
            ours = asyncio.run(env_worker_rounds(f"http://127.0.0.1:{service.port}/v1", args.rounds))
        finally:
            service.close()
    rates = {name: tokens / seconds for name, (tokens, seconds) in (("offline", offline), ("rlbus", ours))}
    sys.stdout.write(f"{args.rounds} rounds of {EXAMPLES_PER_ROUND} x {ROLLOUTS} reverse-text rollouts, "
                     f"<= {MAX_TOKENS} tokens, {model}\n"
                     "path                                   tokens  seconds  tokens/s\n"
                     f"vLLM offline LLM.generate (n=8)      {offline[0]:8d} {offline[1]:8.2f} {rates['offline']:9.0f}\n"
                     f"env-worker -> rlbus inference (HTTP) {ours[0]:8d} {ours[1]:8.2f} {rates['rlbus']:9.0f}\n"
                     + json.dumps({"load_average": os.getloadavg()[0]}) + "\n"
                     f"rollouts rlbus/offline {rates['rlbus'] / rates['offline']:.2f}\n")  # fmt: skip


if __name__ == "__main__":
    main()
