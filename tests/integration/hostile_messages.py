"""Well-formed messages with hostile values, as an admitted but broken or malicious peer sends them.

Every message here decodes: the schema is met, only the values are wrong. The
malformed frames of :mod:`tests.integration.fuzz_frames` test the codec; these
test what the receiving service does with what the codec lets through.

:func:`hostile_results` draws ways to spoil a good result for a real task (one
field, one value each): non-finite or huge floats, token ids outside int32,
policy steps that do not exist yet, wrong rollout counts, mismatched lengths,
another example or environment, bodies sized around ``max_header_bytes``. The
orchestrator must refuse every one with a ``ResultAck(accepted=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from hypothesis import strategies as st

from rlbus.codec import encode
from rlbus.messages import BatchAck, BatchRequest, RolloutResult, RolloutTask, TaskRequest
from tests.unit.orchestrator.fakes import roll_out

NON_FINITE = [math.nan, math.inf, -math.inf]
HUGE_FLOATS = [1e39, -1e39, 1e300, 2e6]  # finite, beyond any reward (MAX_ABS_REWARD is 1e6)
BAD_TOKEN_IDS = [-1, -(2**63), 2**31, 2**63 - 1, 2**64 - 1]  # token ids travel as int32
FUTURE_STEPS = [10**9, 2**63 - 1]


@dataclass
class Spoiled:
    """A result for ``task`` spoiled in one way; ``what`` names the field and value."""

    what: str
    spoil: Callable[[RolloutResult], None]

    def result_for(self, task: RolloutTask) -> RolloutResult:
        good = roll_out(task, policy_step=0, worker_id="hostile")
        # A deep copy: the fake's rollouts share lists (its prompt) that must stay unspoiled.
        result = msgspec.msgpack.decode(msgspec.msgpack.encode(good), type=RolloutResult)
        self.spoil(result)
        return result


def _set_rollout(field: str, value: float, index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        setattr(result.rollouts[index % len(result.rollouts)], field, value)

    return Spoiled(f"rollouts[{index}].{field} = {value!r}", spoil)


def _set_in_dict(field: str, value: float, index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        getattr(result.rollouts[index % len(result.rollouts)], field)["hostile"] = value

    return Spoiled(f"rollouts[{index}].{field}['hostile'] = {value!r}", spoil)


def _set_turn_item(field: str, value: float, index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        turn = result.rollouts[index % len(result.rollouts)].turns[0]
        items = getattr(turn, field)
        items[index % len(items)] = value

    return Spoiled(f"rollouts[{index}].turns[0].{field}[...] = {value!r}", spoil)


def _set_policy_step(value: int, index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        result.rollouts[index % len(result.rollouts)].turns[0].policy_step = value

    return Spoiled(f"rollouts[{index}].turns[0].policy_step = {value}", spoil)


def _set_result(field: str, value: object) -> Spoiled:
    return Spoiled(f"{field} = {value!r:.40}", lambda result: setattr(result, field, value))


def _num_rollouts(count: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        result.rollouts = [msgspec.structs.replace(result.rollouts[0], rollout_id=str(i)) for i in range(count)]

    return Spoiled(f"{count} rollouts", spoil)


def _length_mismatch(index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        result.rollouts[index % len(result.rollouts)].turns[0].completion_logprobs.append(-0.5)

    return Spoiled(f"rollouts[{index}].turns[0]: one logprob more than completion ids", spoil)


def _no_turns(index: int) -> Spoiled:
    def spoil(result: RolloutResult) -> None:
        result.rollouts[index % len(result.rollouts)].turns = []

    return Spoiled(f"rollouts[{index}] without turns (and without error)", spoil)


def _sized(target_bytes: int) -> Spoiled:
    """A body of about ``target_bytes`` (long prompt ids) with one token id out of range: refused
    as unreadable past ``max_header_bytes``, for its value below it."""

    def spoil(result: RolloutResult) -> None:
        turn = result.rollouts[0].turns[0]
        room = target_bytes - len(encode(result)[1])
        turn.prompt_ids = [*turn.prompt_ids, *[1000] * max(0, room // 3), -1]  # 3 bytes each as msgpack uint16

    return Spoiled(f"body of ~{target_bytes} bytes with token id -1", spoil)


def hostile_results(num_rollouts: int, max_header_bytes: int, max_frame_bytes: int) -> st.SearchStrategy[Spoiled]:
    """Spoiled results for tasks of ``num_rollouts`` rollouts; sizes reach past ``max_header_bytes``
    but stay under ``max_frame_bytes`` (a larger frame only drops the connection, in libzmq)."""
    index = st.integers(0, num_rollouts - 1)
    floats = st.sampled_from(NON_FINITE + HUGE_FLOATS)
    return st.one_of(
        st.builds(_set_rollout, st.just("reward"), floats, index),
        st.builds(_set_in_dict, st.sampled_from(["reward_breakdown", "metrics", "timing"]),
                  st.sampled_from(NON_FINITE), index),
        st.builds(_set_turn_item, st.just("completion_logprobs"), st.sampled_from([*NON_FINITE, 5.0]), index),
        st.builds(_set_turn_item, st.sampled_from(["prompt_ids", "completion_ids"]),
                  st.sampled_from(BAD_TOKEN_IDS), index),
        st.builds(_set_policy_step, st.sampled_from([-1, *FUTURE_STEPS]), index),
        st.builds(_num_rollouts, st.sampled_from([0, num_rollouts - 1, num_rollouts + 1, 64])),
        st.builds(_length_mismatch, index),
        st.builds(_no_turns, index),
        st.builds(_set_result, st.just("example_id"), st.sampled_from([-1, 2**63 - 1, 10**6])),
        st.builds(_set_result, st.just("env_id"), st.sampled_from(["", "not-an-env", "b" * 1000])),
        st.builds(_set_result, st.just("is_eval"), st.just(True)),
        st.builds(_sized, st.integers(max_header_bytes - 2048, max_frame_bytes - 1024)),
    )  # fmt: skip


def hostile_requests(max_steps: int, world_size: int) -> list[TaskRequest | BatchRequest | BatchAck]:
    """Requests with values no peer may send: each is counted as bad or answered with ``Refused``."""
    return [
        TaskRequest(worker_id="hostile", num_tasks=-1),
        TaskRequest(worker_id="hostile", num_tasks=-(2**63)),
        BatchRequest(trainer_id="hostile", rank=-1, world_size=world_size, step=1),
        BatchRequest(trainer_id="hostile", rank=world_size, world_size=world_size, step=1),
        BatchRequest(trainer_id="hostile", rank=0, world_size=2**63 - 1, step=1),
        BatchRequest(trainer_id="hostile", rank=0, world_size=world_size, step=0),
        BatchRequest(trainer_id="hostile", rank=0, world_size=world_size, step=-(2**63)),
        BatchRequest(trainer_id="hostile", rank=0, world_size=world_size, step=max_steps + 1),
        BatchRequest(trainer_id="hostile", rank=0, world_size=world_size, step=10**9),
        BatchAck(trainer_id="hostile", step=0),
        BatchAck(trainer_id="hostile", step=-1),
        BatchAck(trainer_id="hostile", step=max_steps + 1),
        BatchAck(trainer_id="hostile", step=10**9),
        BatchAck(trainer_id="hostile", step=max_steps),  # in range, never built: skipped steps before
    ]
