"""The env-worker's teacher: scoring rollouts (opd) and answering turns (sft), against a real HTTP server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from rlbus.config.base import BusConfig
from rlbus.environments import Environment, Rubric, load_environment
from rlbus.messages import Rollout, RolloutResult, RolloutTask, SamplingParams, Turn
from rlbus.services.env_worker.inference import InferenceError
from rlbus.services.env_worker.outgoing import checked_result
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.teacher import ModeRunner, TeacherClient, chat_answer
from rlbus.services.env_worker.tokens import TurnRenderer
from rlbus.teacher import TeacherClientConfig
from tests.teacher_server import MODEL, TeacherBehaviour, serve_teacher, teacher_logprob


def task(mode: str, num_rollouts: int = 2, env_id: str = "reverse-text") -> RolloutTask:
    return RolloutTask(task_id="task-1", env_id=env_id, example_id=0, num_rollouts=num_rollouts,
                       sampling=SamplingParams(max_tokens=64, seed=3), lease_s=60, issued_at=time.time(),
                       training_mode=mode)  # fmt: skip


def client(url: str) -> TeacherClient:
    return TeacherClient(TeacherClientConfig(base_url=url, model=MODEL, max_retries=0))


def two_turn_rollout() -> Rollout:
    turns = [Turn(prompt_ids=[1, 2, 3], completion_ids=[10, 11], completion_logprobs=[-1.0, -2.0],
                  completion_mask=[True, True], policy_step=4),
             Turn(prompt_ids=[20], completion_ids=[30, 31, 32], completion_logprobs=[-0.5] * 3,
                  completion_mask=[True] * 3, policy_step=4)]  # fmt: skip
    return Rollout(rollout_id="r/0", turns=turns, reward=0.5)


def test_each_turn_gets_the_teachers_logprob_of_each_completion_token_from_one_request() -> None:
    behaviour = TeacherBehaviour()
    with serve_teacher(behaviour) as url:
        scored = asyncio.run(client(url).score(two_turn_rollout()))
    assert [t.teacher_logprobs for t in scored.turns] == [[teacher_logprob(10), teacher_logprob(11)],
                                                         [teacher_logprob(t) for t in (30, 31, 32)]]  # fmt: skip
    # One scoring request for the whole sequence, token ids in, one token out, prompt logprobs on.
    ((path, body),) = behaviour.requests
    assert path == "/v1/completions" and body["prompt"] == [1, 2, 3, 10, 11, 20, 30, 31, 32]
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 0 and body["model"] == MODEL
    assert scored.turns[0].completion_logprobs == [-1.0, -2.0]  # the student's stay as they were


def test_a_teacher_without_prompt_logprobs_errors_the_rollout_naming_its_url() -> None:
    errored = Rollout(rollout_id="r/1", turns=[], reward=0.0, error="environment crashed")
    with serve_teacher(TeacherBehaviour(prompt_logprobs=False)) as url:
        scored, untouched = asyncio.run(client(url).score_group([two_turn_rollout(), errored]))
    assert scored.error is not None and f"{url}/completions answered without choices[0].prompt_logprobs" in scored.error
    assert untouched is errored  # not sent to the teacher at all


def test_a_failing_teacher_errors_the_rollout() -> None:
    with serve_teacher(TeacherBehaviour(status=503)) as url:
        (scored,) = asyncio.run(client(url).score_group([two_turn_rollout()]))
    assert scored.error is not None and "could not score" in scored.error and "503" in scored.error


def test_sft_tasks_are_answered_by_the_teacher_and_tokenized_with_the_students_template(
    renderer: TurnRenderer, tokenizer: Any
) -> None:
    env = load_environment("reverse-text", {"num_examples": 4})
    text = env.example(0)["answer"]
    behaviour = TeacherBehaviour(answer=lambda messages: f"<reversed_text>{text}</reversed_text>")
    with serve_teacher(behaviour) as url:
        runner = ModeRunner(RolloutRunner(NoPolicy(), renderer, 5), client(url))
        rollouts = asyncio.run(runner.run_task(task("sft"), env))
    for rollout in rollouts:
        assert rollout.error is None and rollout.reward == 1.0, rollout
        (turn,) = rollout.turns
        # What the student would sample to say the teacher's text: its tokens, then the end of its turn.
        expected = tokenizer.encode(f"<reversed_text>{text}</reversed_text>", add_special_tokens=False)
        assert turn.completion_ids == expected + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        assert turn.completion_logprobs == [0.0] * len(expected + [0]) and turn.policy_step == 0
        assert turn.prompt_ids == tokenizer.apply_chat_template(env.prompt_messages(env.example(0)),
                                                                add_generation_prompt=True, return_dict=False)  # fmt: skip
    chats = [body for path, body in behaviour.requests if path == "/v1/chat/completions"]
    assert len(chats) == 2 and chats[0]["messages"] == env.prompt_messages(env.example(0))
    assert chats[0]["model"] == MODEL and {chats[0]["seed"], chats[1]["seed"]} == {3, 4}


def test_multi_turn_sft_continues_after_the_teachers_turns(renderer: TurnRenderer, tokenizer: Any) -> None:
    env = load_environment("guess-number", {"num_examples": 2, "max_turns": 4})
    secret = env.example(0)["answer"]
    guesses = iter([secret - 1, secret])
    behaviour = TeacherBehaviour(answer=lambda messages: f"<guess>{next(guesses)}</guess>")
    with serve_teacher(behaviour) as url:
        runner = ModeRunner(RolloutRunner(NoPolicy(), renderer, 5), client(url))
        (rollout,) = asyncio.run(runner.run_task(task("sft", num_rollouts=1, env_id="guess-number"), env))
    assert rollout.error is None and len(rollout.turns) == 2 and rollout.reward_breakdown["solved"] == 1.0
    # The token sequence is the chat template's rendering of the whole conversation.
    messages = [
        *env.prompt_messages(env.example(0)),
        {"role": "assistant", "content": f"<guess>{secret - 1}</guess>"},
        {"role": "user", "content": "Higher."},
        {"role": "assistant", "content": f"<guess>{secret}</guess>"},
    ]
    sequence = [t for turn in rollout.turns for t in turn.prompt_ids + turn.completion_ids]
    assert sequence + tokenizer.encode("\n", add_special_tokens=False) == tokenizer.apply_chat_template(
        messages, return_dict=False)  # fmt: skip
    second_chat = [body for path, body in behaviour.requests if path == "/v1/chat/completions"][1]
    assert second_chat["messages"] == messages[:-1]


def test_teacher_tasks_without_a_teacher_come_back_errored_naming_the_key(renderer: TurnRenderer) -> None:
    env = Environment([{"prompt": "hi", "answer": "hi"}], Rubric([lambda completion, answer: 1.0]))
    for mode in ("opd", "sft"):
        rollouts = asyncio.run(ModeRunner(RolloutRunner(NoPolicy(), renderer, 5), None).run_task(task(mode), env))
        assert all("has no [env_worker.teacher]" in (r.error or "") for r in rollouts), rollouts


@pytest.mark.parametrize("data", [{}, {"choices": []}, {"choices": [{"message": None}]},
                                  {"choices": [{"message": {"content": ["not", "text"]}}]}])  # fmt: skip
def test_a_chat_answer_without_a_message_is_an_inference_error(data: dict) -> None:
    with pytest.raises(InferenceError, match="http://t/chat"):
        chat_answer(data, "http://t/chat")


class NoPolicy:
    """The policy of a test where only the teacher may be asked."""

    async def complete(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the policy was asked to sample in a teacher task")


@pytest.mark.parametrize(("teacher", "problem"), [([-0.1], "teacher_logprobs has 1 values for 2 tokens"),
                                                  ([-0.1, float("inf")], "teacher_logprobs[1] is inf"),
                                                  ([0.5, -0.1], "teacher_logprobs[0] is 0.5")])  # fmt: skip
def test_bad_teacher_logprobs_go_out_errored_naming_the_field(teacher: list[float], problem: str) -> None:
    turn = two_turn_rollout().turns[0]
    rollout = Rollout(rollout_id="r/0", turns=[msgspec.structs.replace(turn, teacher_logprobs=teacher)], reward=0.0)
    result = RolloutResult(task_id="t", worker_id="w", env_id="e", example_id=0, rollouts=[rollout])
    checked, num_replaced = checked_result(result, 1, BusConfig())
    assert num_replaced == 1 and problem in (checked.rollouts[0].error or ""), checked.rollouts[0].error
