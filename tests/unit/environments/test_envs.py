"""Built-in environments: rewards on hand-written cases, deterministic data, the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlbus.environments import (
    Environment,
    RolloutState,
    Rubric,
    available_environments,
    checked_reward,
    load_environment,
    load_jsonl,
)
from rlbus.environments.builtin import arithmetic, calculator, guess_number, reverse_text

BUILT_INS = ("reverse-text", "arithmetic", "guess-number", "calculator")


def test_reverse_text_reward_is_the_similarity_of_the_tagged_answer() -> None:
    assert reverse_text.lcs_reward("<reversed_text>olleh</reversed_text>", "olleh") == 1.0
    assert reverse_text.lcs_reward("sure: <reversed_text>\n olleh \n</reversed_text>\n", "olleh") == 1.0
    assert reverse_text.lcs_reward("<reversed_text>olleb</reversed_text>", "olleh") == pytest.approx(0.8)
    assert reverse_text.lcs_reward("olleh", "olleh") == 0.0  # no tags
    assert reverse_text.lcs_reward("<reversed_text>olleh", "olleh") == 0.0  # unclosed
    assert reverse_text.lcs_reward("</reversed_text>olleh<reversed_text>", "olleh") == 0.0  # closed before opened
    assert reverse_text.lcs_reward("<reversed_text></reversed_text>", "olleh") == 0.0


def reverse_text_reward(completion: str, answer: str, finish_reason: str = "stop") -> float:
    """The reward the env-worker's rubric gives one sampled completion (state and all)."""
    env = reverse_text.load_environment(num_examples=1)
    state = RolloutState({"prompt": "x", "answer": answer}, [], 0, completions=[completion])
    state.is_truncated = finish_reason == "length"
    return env.rubric.total({name: func(**env.rubric.inputs(func, state))
                             for name, func in zip(env.rubric.names, env.rubric.funcs, strict=True)})  # fmt: skip


def test_reverse_text_a_correct_answer_that_ends_the_completion_scores_1() -> None:
    assert reverse_text_reward("<reversed_text>\nniw ekevek\n</reversed_text>", "niw ekevek") == 1.0
    # A server that keeps special tokens in the text shows the one the model stopped on.
    assert reverse_text_reward("<reversed_text>olleh</reversed_text><|im_end|>", "olleh") == 1.0


def test_reverse_text_the_gamed_completion_of_the_quickstart_scores_0() -> None:
    """Closing the tag and writing on until max_tokens: the first span was scored, the rest ignored."""
    gamed = "<reversed_text>\ntevek\n</reversed_text>\nen\n</reversed_text>\nniw e"
    assert reverse_text_reward(gamed, "tevek", finish_reason="length") == 0.0
    assert reverse_text_reward(gamed, "tevek", finish_reason="stop") == 0.0  # two closing tags, text after


def test_reverse_text_text_after_the_closing_tag_scores_0() -> None:
    assert reverse_text_reward("<reversed_text>olleh</reversed_text> and more", "olleh") == 0.0
    assert reverse_text_reward("<reversed_text>olleh</reversed_text>\n<|im_end|>x", "olleh") == 0.0


def test_reverse_text_several_answer_spans_score_0() -> None:
    two = "<reversed_text>olleh</reversed_text>\n<reversed_text>olleh</reversed_text>"
    assert reverse_text_reward(two, "olleh") == 0.0
    nested = "<reversed_text>o<reversed_text>olleh</reversed_text>"
    assert reverse_text_reward(nested, "olleh") == 0.0


def test_reverse_text_a_truncated_completion_scores_0_even_with_a_perfect_answer() -> None:
    assert reverse_text_reward("<reversed_text>olleh</reversed_text>", "olleh", finish_reason="length") == 0.0
    assert reverse_text_reward("<reversed_text>olleh</reversed_text>   ", "olleh", finish_reason="length") == 0.0


def test_arithmetic_reward_is_exact_match_on_the_tagged_answer() -> None:
    assert arithmetic.correct_answer("<answer>42</answer>", "42") == 1.0
    assert arithmetic.correct_answer("I think <answer> +42 </answer>", "42") == 1.0
    assert arithmetic.correct_answer("<answer>42.0</answer>", "42") == 0.0
    assert arithmetic.correct_answer("<answer>-7</answer>", "-7") == 1.0
    assert arithmetic.correct_answer("42", "42") == 0.0
    assert arithmetic.correct_answer("<answer>1</answer> then <answer>42</answer>", "42") == 1.0
    assert arithmetic.has_answer_tag("<answer>x</answer>") == 1.0


def test_arithmetic_examples_carry_their_value() -> None:
    env = load_environment("arithmetic", {"num_examples": 50, "seed": 3})
    for index in range(env.num_examples):
        example = env.example(index)
        assert str(arithmetic.safe_eval(example["prompt"].removesuffix(" = ?"))) == example["answer"]


@pytest.mark.parametrize("expression", ["__import__('os')", "x + 1", "2 ** 1000", "(1).real", "[1, 2]", "9" * 300])
def test_safe_eval_refuses_anything_but_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ValueError):
        arithmetic.safe_eval(expression)


def test_safe_eval_computes_arithmetic() -> None:
    assert arithmetic.safe_eval("(347 * 29) - 4 // 3 + -2 ** 2") == 347 * 29 - 4 // 3 + -(2**2)
    with pytest.raises(ValueError, match="division by zero"):
        arithmetic.safe_eval("1 / 0")


def _state(example: dict, assistant_texts: list[str], env_replies: list[str] | None = None) -> RolloutState:
    messages = [{"role": "user", "content": example["prompt"]}]
    for number, text in enumerate(assistant_texts):
        messages.append({"role": "assistant", "content": text})
        if env_replies and number < len(env_replies):
            messages.append({"role": "user", "content": env_replies[number]})
    return RolloutState(example, messages, 1, completions=list(assistant_texts), turn=len(assistant_texts))


def test_guess_number_replies_higher_lower_and_stops_when_solved() -> None:
    env = load_environment("guess-number", {"num_examples": 5, "low": 1, "high": 100, "max_turns": 4})
    example = env.example(0)
    secret = example["answer"]
    assert env.env_response(_state(example, [f"<guess>{secret - 1}</guess>"])) == [
        {"role": "user", "content": "Higher."}
    ]
    assert env.env_response(_state(example, [f"<guess>{secret + 1}</guess>"])) == [
        {"role": "user", "content": "Lower."}
    ]
    assert "<guess>" in env.env_response(_state(example, ["fifty"]))[0]["content"]
    assert env.env_response(_state(example, [f"<guess> {secret} </guess>"])) is None


def test_guess_number_rewards_success_and_fewer_turns() -> None:
    env = load_environment("guess-number", {"num_examples": 5, "max_turns": 4})
    example = env.example(1)
    secret, info = example["answer"], example["info"]

    def rewards(texts: list[str]) -> tuple[float, float]:
        messages = _state(example, texts, ["Higher."] * len(texts)).messages
        return guess_number.solved(messages, secret), guess_number.turns_left(messages, secret, info)

    assert rewards([f"<guess>{secret}</guess>"]) == (1.0, 1.0)
    assert rewards(["<guess>-5</guess>", "no idea", "<guess>-1</guess>", f"<guess>{secret}</guess>"]) == (1.0, 0.25)
    assert rewards(["<guess>-5</guess>"]) == (0.0, 0.0)


def test_calculator_tool_and_reward() -> None:
    env = load_environment("calculator", {"num_examples": 3})
    assert env.tools[0]["function"]["name"] == "calculate"
    assert calculator.calculate("12 * 12") == "144"
    example = env.example(0)
    assert calculator.correct_answer(f"<answer>{example['answer']}</answer>", example["answer"]) == 1.0
    state = _state(example, ["<answer>1</answer>"])
    assert calculator.used_calculator(state) == 0.0
    state.metrics["num_tool_calls"] = 2
    assert calculator.used_calculator(state) == 1.0


@pytest.mark.parametrize("env_id", BUILT_INS)
def test_built_ins_are_registered_and_deterministic(env_id: str) -> None:
    assert env_id in available_environments()
    first, again = load_environment(env_id, {"seed": 7}), load_environment(env_id, {"seed": 7})
    other = load_environment(env_id, {"seed": 8})
    assert first.num_examples == 1000
    examples = [first.example(i) for i in range(first.num_examples)]
    assert examples == [again.example(i) for i in range(again.num_examples)]
    assert examples != [other.example(i) for i in range(other.num_examples)]
    for example in examples[:20]:
        messages = first.prompt_messages(example)
        assert messages[-1]["role"] == "user" and messages[-1]["content"]


def test_registry_names_unknown_environments_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown environment 'nope'.*reverse-text"):
        load_environment("nope", {})
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['num_exampels'\]"):
        load_environment("reverse-text", {"num_exampels": 3})
    with pytest.raises(ValueError, match="min_words <= max_words"):
        load_environment("reverse-text", {"min_words": 5, "max_words": 2})


def test_example_index_out_of_range_names_the_range() -> None:
    env = load_environment("arithmetic", {"num_examples": 4})
    with pytest.raises(IndexError, match="example 4 does not exist; this environment has 4"):
        env.example(4)


def test_rubric_checks_functions_and_rewards() -> None:
    def reward(completion: str, answer: str) -> float:
        return 1.0

    def wants_more(completion: str, tokens: list) -> float:
        return 0.0

    with pytest.raises(ValueError, match="asks for \\['tokens'\\]"):
        Rubric([wants_more])
    with pytest.raises(ValueError, match="one weight per function"):
        Rubric([reward], [1.0, 2.0])
    rubric = Rubric([reward], [0.5])
    assert rubric.total({"reward": 1.0}) == 0.5
    assert checked_reward("r", True) == 1.0 and checked_reward("r", 3) == 3.0
    for bad in (float("nan"), float("inf"), "1.0", None, [1.0]):
        with pytest.raises(ValueError, match="reward function r returned"):
            checked_reward("r", bad)


def test_system_prompt_and_message_prompts() -> None:
    env = Environment([{"prompt": "hi"}, {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "x"}]},
                       {"prompt": 3}], Rubric([]), system_prompt="sys")  # fmt: skip
    assert env.prompt_messages(env.example(0)) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert env.prompt_messages(env.example(1))[0] == {"role": "system", "content": "own"}
    with pytest.raises(ValueError, match="prompt must be a string or a list of chat messages"):
        env.prompt_messages(env.example(2))


def test_load_jsonl_reads_examples_and_names_bad_lines(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    assert load_jsonl(good) == [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"answer": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 must be an object with a 'prompt'"):
        load_jsonl(bad)


def test_the_env_worker_needs_no_torch_vllm_or_transformers() -> None:
    code = (
        "import sys; sys.modules.update(torch=None, vllm=None, transformers=None)\n"
        "import rlbus.services.env_worker.main, rlbus.services.env_worker.service\n"
        "from rlbus.environments import load_environment\n"
        "for name in ('reverse-text', 'arithmetic', 'guess-number', 'calculator'):\n"
        "    load_environment(name, {'num_examples': 2})\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
