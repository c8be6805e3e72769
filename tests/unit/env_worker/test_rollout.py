"""The rollout loop: token continuity over turns, scoring, and every way a rollout can fail."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rlbus.environments import Environment, RolloutState, Rubric, load_environment
from rlbus.messages import RolloutTask, SamplingParams
from rlbus.services.env_worker.inference import InferenceUnavailable
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.tokens import TurnRenderer


def task(env_id: str = "test", example_id: int = 0, num_rollouts: int = 2, **sampling: Any) -> RolloutTask:
    return RolloutTask(
        task_id="task-1", env_id=env_id, example_id=example_id, num_rollouts=num_rollouts,
        sampling=SamplingParams(**sampling), lease_s=60, issued_at=time.time(),
    )  # fmt: skip


def exact(completion: str, answer: str) -> float:
    return float(completion == answer)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown so threads a test leaves stuck in environment code finish."""
    event = threading.Event()
    yield event
    event.set()


def test_single_turn_rollouts_carry_tokens_logprobs_reward(scripted, renderer: TurnRenderer, tokenizer: Any) -> None:
    env = Environment([{"prompt": "say hi", "answer": "hi"}], Rubric([exact]), system_prompt="Be brief.")
    sampler = scripted(lambda prompt, seed: "hi" if seed == 10 else "hello")
    rollouts = asyncio.run(RolloutRunner(sampler, renderer, 5).run_task(task(seed=10), env))
    assert [r.rollout_id for r in rollouts] == ["task-1/0", "task-1/1"]
    assert [r.reward for r in rollouts] == [1.0, 0.0]
    assert rollouts[0].reward_breakdown == {"exact": 1.0}
    (turn,) = rollouts[0].turns
    expected_prompt = tokenizer.apply_chat_template(env.prompt_messages(env.example(0)), add_generation_prompt=True,
                                                    return_dict=False)  # fmt: skip
    assert turn.prompt_ids == expected_prompt
    assert tokenizer.decode(turn.completion_ids, skip_special_tokens=True) == rollouts[0].completion_text == "hi"
    assert len(turn.completion_logprobs) == len(turn.completion_ids) == len(turn.completion_mask)
    assert all(turn.completion_mask) and turn.policy_step == 3
    assert rollouts[0].prompt_text == "[system] Be brief.\n\n[user] say hi"
    assert rollouts[0].metrics == {"num_turns": 1.0, "num_completion_tokens": 3.0}
    assert rollouts[0].error is None and set(rollouts[0].timing) >= {"generate", "env", "score", "total"}
    assert rollouts[0].answer == "hi"  # the example's reference answer, shown in samples.jsonl


def guess_sequence(guesses: list[int]):
    def reply(prompt: list[int], seed: int | None) -> str:
        turn = reply.calls = getattr(reply, "calls", 0) + 1
        return f"<guess>{guesses[min(turn, len(guesses)) - 1]}</guess>"

    return reply


def test_multi_turn_appends_only_new_tokens(scripted, renderer: TurnRenderer, tokenizer: Any) -> None:
    env = load_environment("guess-number", {"num_examples": 2, "max_turns": 5})
    secret = env.example(0)["answer"]
    sampler = scripted(guess_sequence([secret - 3, secret + 2, secret]))
    (rollout,) = asyncio.run(RolloutRunner(sampler, renderer, 5).run_task(task("guess-number", num_rollouts=1), env))
    assert rollout.error is None and len(rollout.turns) == 3
    assert rollout.reward_breakdown == {"solved": 1.0, "turns_left": pytest.approx(3 / 5)}
    assert rollout.answer == str(secret)  # an integer answer travels as text
    # Each request's prompt is exactly everything before it: earlier tokens are never re-tokenized.
    sequence: list[int] = []
    for turn, prompt in zip(rollout.turns, sampler.prompts, strict=True):
        sequence += turn.prompt_ids
        assert prompt == sequence
        sequence += turn.completion_ids
    # ... and the whole sequence is what the chat template makes of the conversation.
    messages = env.prompt_messages(env.example(0))
    for guess, reply in ((secret - 3, "Higher."), (secret + 2, "Lower."), (secret, None)):
        messages.append({"role": "assistant", "content": f"<guess>{guess}</guess>"})
        if reply:
            messages.append({"role": "user", "content": reply})
    rendered = tokenizer.apply_chat_template(messages, return_dict=False)
    assert sequence + tokenizer.encode("\n", add_special_tokens=False) == rendered
    assert (
        tokenizer.decode(rollout.turns[1].prompt_ids)
        == "\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_calls_run_and_the_final_answer_is_scored(scripted, renderer: TurnRenderer, tokenizer: Any) -> None:
    env = load_environment("calculator", {"num_examples": 2})
    example = env.example(0)
    expression = example["prompt"].removeprefix("What is ").removesuffix("?")
    call = f'<tool_call>\n{{"name": "calculate", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'

    def reply(prompt: list[int], seed: int | None) -> str:
        seen = tokenizer.decode(prompt)
        if "<|im_start|>tool" not in seen:
            return call
        return f"<answer>{seen.split('<|im_start|>tool')[-1].split('<|im_end|>')[0].strip()}</answer>"

    (rollout,) = asyncio.run(
        RolloutRunner(scripted(reply), renderer, 5).run_task(task("calculator", num_rollouts=1), env)
    )
    assert rollout.error is None
    assert rollout.reward == 1.0 and rollout.metrics["num_tool_calls"] == 1.0
    assert tokenizer.decode(rollout.turns[1].prompt_ids) == (
        f"\n<|im_start|>tool\n{example['answer']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "[tool] " + example["answer"] in rollout.completion_text


def test_a_turn_cut_at_max_tokens_is_closed_and_marked_truncated(
    scripted, renderer: TurnRenderer, tokenizer: Any
) -> None:
    env = load_environment("guess-number", {"num_examples": 1, "max_turns": 2})
    sampler = scripted(lambda prompt, seed: "<guess>1", end_turn=False)
    (rollout,) = asyncio.run(RolloutRunner(sampler, renderer, 5).run_task(task("guess-number", num_rollouts=1), env))
    assert rollout.is_truncated and len(rollout.turns) == 2
    assert tokenizer.decode(rollout.turns[1].prompt_ids).startswith("<|im_end|>\n<|im_start|>user\n")


class Misbehaving(Environment):
    """Fails in the way its example says."""

    def __init__(self, release: threading.Event) -> None:
        kinds = ["raise", "sync-hang", "async-hang", "nan", "string", "bad-reply", "reward-raises", "ok"]
        super().__init__([{"prompt": kind, "answer": kind} for kind in kinds], Rubric([self.reward]), max_turns=2)
        self.release = release

    def env_response(self, state: RolloutState) -> Any:
        kind = state.answer
        if kind == "raise":
            raise ValueError("boom")
        if kind == "sync-hang":
            self.release.wait()
        if kind == "async-hang":
            return asyncio.Event().wait()  # a coroutine that never finishes
        return "not messages" if kind == "bad-reply" else None

    def reward(self, answer: str) -> Any:
        if answer == "reward-raises":
            raise KeyError("missing")
        return {"nan": float("nan"), "string": "1.0"}.get(answer, 1.0)


@pytest.mark.parametrize(("kind", "error"), [
    ("raise", "env_response raised ValueError: boom"),
    ("sync-hang", "environment timed out in env_response (env_timeout_s=0.5)"),
    ("async-hang", "environment timed out in env_response (env_timeout_s=0.5)"),
    ("nan", "reward function reward returned nan"),
    ("string", "reward function reward returned str '1.0', not a number"),
    ("bad-reply", "env_response must return a list of chat messages or None, got 'not messages'"),
    ("reward-raises", "reward function reward raised KeyError: 'missing'"),
])  # fmt: skip
def test_environment_failures_give_errored_rollouts_and_the_runner_goes_on(
    scripted, renderer: TurnRenderer, release: threading.Event, kind: str, error: str
) -> None:
    env = Misbehaving(release)
    runner = RolloutRunner(scripted(lambda prompt, seed: "x"), renderer, env_timeout_s=0.5)

    async def both() -> tuple[list, list]:
        failed = await runner.run_task(task(example_id=env.examples.index({"prompt": kind, "answer": kind})), env)
        fine = await runner.run_task(task(example_id=len(env.examples) - 1), env)
        return failed, fine

    failed, fine = asyncio.run(both())
    assert [r.error for r in failed] == [error, error]
    assert all(r.reward == 0.0 for r in failed)
    assert [(r.error, r.reward) for r in fine] == [(None, 1.0), (None, 1.0)]


def test_inference_failure_and_overlong_prompts_error_the_rollout(renderer: TurnRenderer) -> None:
    class Down:
        async def complete(self, *args: Any, **kwargs: Any) -> Any:
            raise InferenceUnavailable("/completions failed 6 time(s): connection refused")

    env = Environment([{"prompt": "x" * 50}], Rubric([]))
    (rollout,) = asyncio.run(RolloutRunner(Down(), renderer, 5).run_task(task(num_rollouts=1), env))
    assert rollout.error == "/completions failed 6 time(s): connection refused"

    class Short(TurnRenderer):
        async def prompt(self, messages: list, tools: list) -> Any:
            tokenized = await super().prompt(messages, tools)
            tokenized.max_model_len = 40
            return tokenized

    (rollout,) = asyncio.run(RolloutRunner(Down(), Short(renderer.tokenizer), 5).run_task(task(num_rollouts=1), env))
    assert rollout.error is not None and "fills max_model_len=40" in rollout.error


def test_a_bad_example_errors_the_whole_group(scripted, renderer: TurnRenderer) -> None:
    env = Environment([{"prompt": None}], Rubric([]))
    rollouts = asyncio.run(RolloutRunner(scripted(lambda p, s: "x"), renderer, 5).run_task(task(num_rollouts=3), env))
    assert len(rollouts) == 3
    assert all("cannot build the prompt of example 0: prompt_messages raised ValueError" in r.error for r in rollouts)
    rollouts = asyncio.run(RolloutRunner(scripted(lambda p, s: "x"), renderer, 5).run_task(task(example_id=5), env))
    assert all("example 5 does not exist" in r.error for r in rollouts)


def test_non_numeric_metrics_error_and_non_finite_ones_are_dropped(scripted, renderer: TurnRenderer) -> None:
    class Metrics(Environment):
        def setup(self, state: RolloutState) -> None:
            state.metrics.update(self.examples[0]["info"])

    runner = RolloutRunner(scripted(lambda p, s: "x"), renderer, 5)
    env = Metrics([{"prompt": "p", "info": {"ok": 2, "nan": float("nan")}}], Rubric([]))
    (rollout,) = asyncio.run(runner.run_task(task(num_rollouts=1), env))
    assert rollout.metrics == {"num_turns": 1.0, "num_completion_tokens": 2.0, "ok": 2.0}
    env = Metrics([{"prompt": "p", "info": {"bad": "high"}}], Rubric([]))
    (rollout,) = asyncio.run(runner.run_task(task(num_rollouts=1), env))
    assert rollout.error == "metric bad is str 'high', not a number"


def test_a_groups_first_turn_is_one_request_for_all_its_rollouts(scripted, renderer: TurnRenderer, tokenizer) -> None:
    """A sampler with ``complete_n`` gets one request per group for turn 0; later turns go one by one."""
    inner = scripted(lambda prompt, seed: f"guess {seed}")

    class Grouping:
        def __init__(self) -> None:
            self.groups: list[tuple[int, int | None]] = []

        async def complete(self, *args: Any) -> Any:
            return await inner.complete(*args)

        async def complete_n(self, prompt_ids, sampling, max_tokens, n, seed):  # type: ignore[no-untyped-def]
            self.groups.append((n, seed))
            return [await inner.complete(prompt_ids, sampling, max_tokens, seed + i) for i in range(n)]

    class TwoTurns(Environment):
        def env_response(self, state: RolloutState) -> list:
            return [{"role": "user", "content": "again"}]

    sampler = Grouping()
    env = TwoTurns([{"prompt": "go"}], Rubric([]), max_turns=2)
    rollouts = asyncio.run(RolloutRunner(sampler, renderer, 5).run_task(task(num_rollouts=3, seed=10), env))
    assert sampler.groups == [(3, 10)]
    assert [len(r.turns) for r in rollouts] == [2, 2, 2] and all(r.error is None for r in rollouts)
    # Turn 0 of rollout i is the group's i-th sample (seed 10 + i); turn 1 is its own request, seeded
    # 10 + 3 + i so that it does not replay turn 0's random stream.
    assert [tokenizer.decode(r.turns[0].completion_ids[:-1]) for r in rollouts] == ["guess 10", "guess 11", "guess 12"]
    assert [tokenizer.decode(r.turns[1].completion_ids[:-1]) for r in rollouts] == ["guess 13", "guess 14", "guess 15"]
    assert len(inner.prompts) == 6


def test_a_failed_group_request_errors_every_rollout(renderer: TurnRenderer) -> None:
    class Down:
        async def complete(self, *args: Any) -> Any:
            raise AssertionError("turn 0 goes through complete_n")

        async def complete_n(self, *args: Any) -> Any:
            raise InferenceUnavailable("/completions failed 6 time(s): connection refused")

    env = Environment([{"prompt": "x"}], Rubric([]))
    rollouts = asyncio.run(RolloutRunner(Down(), renderer, 5).run_task(task(num_rollouts=4), env))
    assert [r.error for r in rollouts] == ["/completions failed 6 time(s): connection refused"] * 4
    assert all(r.prompt_text == "x" for r in rollouts)


class Hostile(Environment):
    """Breaks the runner outside the hooks' own guard, in the way its example says."""

    def __init__(self, kind: str) -> None:
        super().__init__([{"prompt": kind, "answer": kind}], Rubric([]), max_turns=2)
        self.kind = kind

    @property
    def max_turns(self) -> int:
        if self.kind == "max-turns-raises":
            raise RuntimeError("no turn budget")
        return self._max_turns

    @max_turns.setter
    def max_turns(self, value: int) -> None:
        self._max_turns = value

    def parse_assistant(self, text: str) -> Any:
        return {"content": text} if self.kind == "roleless-assistant" else super().parse_assistant(text)

    def env_response(self, state: RolloutState) -> Any:
        if state.turn > 1:
            return None
        role = "assistant" if self.kind == "assistant-reply" else "user"
        return [{"role": role, "content": "again"}]


@pytest.mark.parametrize(("kind", "error"), [
    ("assistant-reply", "env_response may answer with user, tool or system messages, got role 'assistant'"),
    ("roleless-assistant", "KeyError: 'role'"),
    ("max-turns-raises", "RuntimeError: no turn budget"),
])  # fmt: skip
def test_an_exception_anywhere_in_a_rollout_errors_it(scripted, renderer: TurnRenderer, kind: str, error: str) -> None:
    runner = RolloutRunner(scripted(lambda prompt, seed: "x"), renderer, env_timeout_s=5)
    rollouts = asyncio.run(runner.run_task(task(num_rollouts=2), Hostile(kind)))
    assert len(rollouts) == 2 and all(error in (r.error or "") for r in rollouts), [r.error for r in rollouts]
    assert [r.reward for r in rollouts] == [0.0, 0.0]
    assert [r.rollout_id for r in rollouts] == ["task-1/0", "task-1/1"]


class StuckBeforeThePrompt(Environment):
    """``example`` or ``prompt_messages`` blocks its thread until ``release`` is set."""

    def __init__(self, hook: str, release: threading.Event) -> None:
        super().__init__([{"prompt": "p"}], Rubric([]))
        self.hook, self.release = hook, release

    def example(self, index: int) -> dict[str, Any]:
        if self.hook == "example":
            self.release.wait()
        return super().example(index)

    def prompt_messages(self, example: dict[str, Any]) -> list:
        if self.hook == "prompt_messages":
            self.release.wait()
        return super().prompt_messages(example)


@pytest.mark.parametrize("hook", ["example", "prompt_messages"])
def test_a_hanging_example_or_prompt_times_out_off_the_event_loop(
    scripted, renderer: TurnRenderer, release: threading.Event, hook: str
) -> None:
    # Backstop only: were the hook run on the loop, nothing else could end the test.
    backstop = threading.Timer(20, release.set)
    backstop.start()
    runner = RolloutRunner(scripted(lambda prompt, seed: "x"), renderer, env_timeout_s=0.3)

    async def run_and_tick() -> tuple[list, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        rollouts = await runner.run_task(task(num_rollouts=2), StuckBeforeThePrompt(hook, release))
        ticker.cancel()
        return rollouts, ticks

    try:
        rollouts, ticks = asyncio.run(run_and_tick())
    finally:
        backstop.cancel()
    expected = f"cannot build the prompt of example 0: environment timed out in {hook} (env_timeout_s=0.3)"
    assert [r.error for r in rollouts] == [expected, expected]
    assert ticks > 0  # the loop went on while the hook hung
    assert not release.is_set()


def test_a_weighted_reward_that_overflows_errors_the_rollout(scripted, renderer: TurnRenderer) -> None:
    def big() -> float:
        return 10.0

    env = Environment([{"prompt": "p"}], Rubric([big], weights=[1e308]))
    (rollout,) = asyncio.run(RolloutRunner(scripted(lambda p, s: "x"), renderer, 5).run_task(task(num_rollouts=1), env))
    assert rollout.error == "the weighted reward of {'big': 10.0} is inf, not a finite number"
    assert rollout.reward == 0.0


def test_transcripts_keep_the_conversation_of_each_good_rollout_when_asked(scripted, renderer: TurnRenderer) -> None:
    env = load_environment("guess-number", {"num_examples": 1, "max_turns": 2})
    secret = env.example(0)["answer"]

    def reply(prompt: list[int], seed: int | None) -> str:  # turn 0 of rollout 0 is seeded 10: it guesses right
        return f"<guess>{secret}</guess>" if seed == 10 else ("oops" if seed == 11 else "<guess>0</guess>")

    def no_oops(messages: list) -> float:
        assert all(m["content"] != "oops" for m in messages), "a reward function that raises"
        return 1.0

    env.rubric = Rubric([no_oops])
    kept: dict = {}
    rollouts = asyncio.run(RolloutRunner(scripted(reply), renderer, 5, transcripts=kept).run_task(
        task("guess-number", num_rollouts=3, seed=10), env))  # fmt: skip
    assert [r.error is None for r in rollouts] == [True, False, True]
    assert sorted(kept) == ["task-1/0", "task-1/2"]  # not the errored one
    prompt = env.prompt_messages(env.example(0))
    assert kept["task-1/0"].messages == [*prompt, {"role": "assistant", "content": f"<guess>{secret}</guess>"}]
    assert kept["task-1/2"].messages == [*prompt, {"role": "assistant", "content": "<guess>0</guess>"},
                                         {"role": "user", "content": "Higher."},
                                         {"role": "assistant", "content": "<guess>0</guess>"}]  # fmt: skip
    assert kept["task-1/0"].tools == []
    assert RolloutRunner(scripted(reply), renderer, 5).transcripts is None  # the env-worker keeps none
