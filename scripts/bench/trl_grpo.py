"""TRL's GRPOTrainer on an rlbus environment: the peer side of ``scripts/bench/vs_trl.py``.

One process, TRL's own loop (``model.generate`` for rollouts, then the GRPO loss),
with the hyper-parameters ``vs_trl.py`` passes, so both sides train the same model
on the same prompts, batch shape and schedule. Writes one JSON object: wall time
with and without start-up, per-step times split into generation (TRL's
``_generate_and_score_completions``, wrapped with a timer) and training (the rest
of the step), completion tokens and rewards per step.

    python scripts/bench/trl_grpo.py --model PATH --out result.json [--steps 30] [--lr 3e-4] ...

Needs ``trl`` beside the CPU torch (``pip install 'rlbus[bench]'``, which pulls no other torch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF model folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples-per-step", type=int, default=8)
    parser.add_argument("--rollouts-per-example", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="subtract this x completion tokens / max tokens from each reward (as rlbus's "
                             "orchestrator.advantage.length_penalty does), so a model that never earns the task's "
                             "reward still trains on something")
    parser.add_argument("--env-args", default='{"min_words": 1, "max_words": 2}', help="reverse-text arguments (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def dataset_rows(env_args: dict[str, Any]) -> list[dict[str, Any]]:
    """The reverse-text prompts (system + user messages) and answers rlbus samples from."""
    from rlbus.environments.builtin.reverse_text import load_environment

    env = load_environment(**env_args)
    return [{"prompt": env.prompt_messages(env.example(i)), "answer": env.example(i)["answer"]}
            for i in range(env.num_examples)]  # fmt: skip


def reverse_text_reward(penalty: float, max_tokens: int) -> Any:
    """The environment's own reward (difflib ratio of the tagged answer) on TRL's chat completions, less
    ``penalty`` x the share of ``max_tokens`` used."""
    from rlbus.environments.builtin.reverse_text import lcs_reward

    def reward(completions: list, answer: list, completion_ids: list, **_: Any) -> list[float]:
        return [lcs_reward(completion[0]["content"], target) - penalty * len(ids) / max_tokens
                for completion, target, ids in zip(completions, answer, completion_ids)]  # fmt: skip

    reward.__name__ = "reverse_text_reward"
    return reward


class StepClock:
    """Per-step wall time, generation time and completion tokens, from TRL's callbacks and a timer."""

    def __init__(self) -> None:
        self.step_started = 0.0
        self.generate_s = 0.0
        self.steps: list[dict[str, float]] = []
        self.first_step_started: float | None = None

    def wrap_generation(self, trainer: Any) -> None:
        inner = trainer._generate_and_score_completions

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.generate_s += time.perf_counter() - started

        trainer._generate_and_score_completions = timed


def main() -> None:
    args = parse_args()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    batch = args.examples_per_step * args.rollouts_per_example
    config = GRPOConfig(
        output_dir=str(args.out.parent / "trl-output"), max_steps=args.steps, per_device_train_batch_size=batch,
        num_generations=args.rollouts_per_example, gradient_accumulation_steps=1, steps_per_generation=1,
        max_completion_length=args.max_tokens, temperature=args.temperature, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=1.0, beta=0.0, loss_type="dapo", scale_rewards="none", bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reward = reverse_text_reward(args.length_penalty, args.max_tokens)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(dataset_rows(json.loads(args.env_args))))  # fmt: skip
    clock = StepClock()
    clock.wrap_generation(trainer)
    logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            clock.step_started = time.perf_counter()
            clock.first_step_started = clock.first_step_started or clock.step_started
            clock.generate_s = 0.0

        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_s = time.perf_counter() - clock.step_started
            clock.steps.append({"step_s": step_s, "generate_s": clock.generate_s,
                                "train_s": step_s - clock.generate_s})  # fmt: skip

        def on_log(self, _args: Any, _state: Any, _control: Any, **kwargs: Any) -> None:
            entry = kwargs.get("logs") or {}
            if "reward" in entry:
                logs.append(dict(entry))

    trainer.add_callback(Clock())
    trainer.train()
    ended = time.perf_counter()
    for step, entry in zip(clock.steps, logs):
        step["reward"] = float(entry["reward"])
        step["completion_tokens"] = float(entry.get("completions/mean_length", 0.0)) * batch
    args.out.write_text(json.dumps({
        "wall_s": ended - STARTED, "steps_s": ended - (clock.first_step_started or ended), "steps": clock.steps,
        "torch_threads": torch.get_num_threads(),
    }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
