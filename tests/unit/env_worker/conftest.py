"""Fixtures of the env-worker tests: the tiny model's real tokenizer and a scripted sampler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rlbus.messages import SamplingParams
from rlbus.services.env_worker.inference import Completion
from rlbus.services.env_worker.tokens import HFChatTokenizer, TurnRenderer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from rlbus.services.models.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def renderer(tokenizer: Any) -> TurnRenderer:
    return TurnRenderer(HFChatTokenizer(tokenizer))


@dataclass
class ScriptedSampler:
    """Answers each request with ``reply(prompt_ids, seed)`` encoded by the real tokenizer,
    ending the turn with ``<|im_end|>`` as a chat model would; records every prompt."""

    tokenizer: Any
    reply: Callable[[list[int], int | None], str]
    policy_step: int = 3
    end_turn: bool = True
    prompts: list[list[int]] = field(default_factory=list)

    async def complete(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int,
                       seed: int | None = None) -> Completion:  # fmt: skip
        self.prompts.append(list(prompt_ids))
        text = self.reply(prompt_ids, seed)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.end_turn:
            ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        return Completion(
            token_ids=ids, logprobs=[-0.25] * len(ids), text=text, finish_reason="stop" if self.end_turn else "length",
            policy_step=self.policy_step, prompt_token_ids=list(prompt_ids),
        )  # fmt: skip


@pytest.fixture
def scripted(tokenizer: Any) -> Callable[..., ScriptedSampler]:
    return lambda reply, **kwargs: ScriptedSampler(tokenizer, reply, **kwargs)
