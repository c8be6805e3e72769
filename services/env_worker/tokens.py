"""Token-in/token-out rendering of chat turns.

Turn 0 renders the prompt messages with the policy's chat template. Every
later turn appends only the *new* tokens — the end of the model's turn and the
environment's reply, rendered as their own chat-template segment — to the
tokens the model already saw and produced. Earlier turns are never rendered
or tokenized again, so the sampled tokens and their logprobs stay exactly
what the trainer gets.

The template lives with the tokenizer of the served model, so rendering is
delegated to a :class:`ChatTokenizer`: by default the inference server's
``/tokenize`` endpoint (the env-worker needs neither the model files nor
torch), or :class:`HFChatTokenizer` around a local transformers tokenizer.

How a segment is cut out of a template that only renders whole
conversations: render a stand-in history (``user: "."``, ``assistant: "."``)
followed by the new messages, and take everything from the token that closes
the stand-in assistant turn. That token is found by counting the template's
end-of-turn tokens, which also works for templates (Qwen3) that render an
assistant turn differently once it is no longer the last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from rlbus.environments import Message

_STAND_IN_USER: Message = {"role": "user", "content": "."}


@dataclass
class TokenizedChat:
    ids: list[int]
    max_model_len: int | None = None
    """Longest prompt + completion the server accepts, when it says."""


class ChatTokenizer(Protocol):
    async def tokenize_chat(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> TokenizedChat: ...


class TemplateError(ValueError):
    """The chat template cannot be rendered one segment at a time."""


@dataclass(frozen=True)
class TurnClosing:
    """How the template closes an assistant turn, e.g. ``<|im_end|>`` ``\\n`` for ChatML."""

    ids: tuple[int, ...]
    end_of_turn: int
    """The first closing token: what the model samples to end its turn."""
    num_before: int
    """End-of-turn tokens the stand-in history holds before its assistant turn."""


class TurnRenderer:
    """Prompt tokens of turn 0 and the appended tokens of every later turn."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self._closings: dict[str, TurnClosing] = {}

    async def prompt(self, messages: list[Message], tools: list[dict[str, Any]]) -> TokenizedChat:
        """The whole turn-0 prompt, ending with the template's generation prompt."""
        return await self.tokenizer.tokenize_chat(messages, tools, add_generation_prompt=True)

    async def continuation(
        self, assistant: Message, new_messages: list[Message], tools: list[dict[str, Any]], completion_ids: list[int]
    ) -> list[int]:
        """Tokens to append after ``completion_ids`` (the model's turn parsed as ``assistant``)
        so that the context holds ``new_messages`` and the next generation prompt."""
        closing = await self.closing(tools)
        stand_in = [_STAND_IN_USER, {"role": "assistant", "content": ".", **_tool_calls_of(assistant)}]
        full = (await self.tokenizer.tokenize_chat(stand_in + new_messages, tools, add_generation_prompt=True)).ids
        start = _nth_index(full, closing.end_of_turn, closing.num_before)
        if start is None or tuple(full[start : start + len(closing.ids)]) != closing.ids:
            raise TemplateError(
                "the chat template does not close an assistant turn the same way when messages follow it; "
                f"expected {list(closing.ids)} after the assistant content, got {full[start:][:8] if start is not None else full[-8:]}"
            )
        segment = full[start:]
        # The model usually ended its turn itself; if it was cut off, the segment closes the turn for it.
        if completion_ids and completion_ids[-1] == closing.end_of_turn:
            segment = segment[1:]
        return segment

    async def assistant_ids(self, content: str, tools: list[dict[str, Any]], stopped: bool) -> list[int]:
        """The tokens a model samples to answer ``content`` after a generation prompt, as the chat
        template renders them, ending with the end-of-turn token when the answer ``stopped`` (as a
        sampled turn does: :meth:`continuation` then adds the rest of the closing). For text from a
        model that returns no token ids (SFT from a teacher); cut from a stand-in history as
        :meth:`continuation` does, so the content's tokens do not depend on the conversation."""
        closing = await self.closing(tools)
        tokenize = self.tokenizer.tokenize_chat
        prompt = (await tokenize([_STAND_IN_USER], tools, add_generation_prompt=True)).ids
        answer = {"role": "assistant", "content": content}
        rendered = (await tokenize([_STAND_IN_USER, answer], tools, add_generation_prompt=False,
                                   continue_final_message=True)).ids  # fmt: skip
        if rendered[: len(prompt)] != prompt:
            raise TemplateError(
                "the chat template does not render an assistant turn after its generation prompt: "
                f"{rendered[len(prompt) - 8 : len(prompt)]} where the prompt ends {prompt[-8:]}"
            )
        return rendered[len(prompt) :] + ([closing.end_of_turn] if stopped else [])

    async def closing(self, tools: list[dict[str, Any]]) -> TurnClosing:
        """The template's assistant-turn closing (cached per tool set)."""
        key = json.dumps(tools, sort_keys=True)
        if key not in self._closings:
            self._closings[key] = await self._measure_closing(tools)
        return self._closings[key]

    async def _measure_closing(self, tools: list[dict[str, Any]]) -> TurnClosing:
        stand_in = [_STAND_IN_USER, {"role": "assistant", "content": "."}]
        tokenize = self.tokenizer.tokenize_chat
        open_ids = (await tokenize(stand_in, tools, add_generation_prompt=False, continue_final_message=True)).ids
        closed_ids = (await tokenize(stand_in, tools, add_generation_prompt=False)).ids
        closing = closed_ids[len(open_ids) :]
        if closed_ids[: len(open_ids)] != open_ids or not closing:
            raise TemplateError(
                "cannot find how the chat template closes an assistant turn: the rendering of a finished turn "
                f"({closed_ids[-8:]}...) does not extend the open one ({open_ids[-8:]}...)"
            )
        return TurnClosing(ids=tuple(closing), end_of_turn=closing[0], num_before=open_ids.count(closing[0]))


class HFChatTokenizer:
    """A :class:`ChatTokenizer` over a local transformers tokenizer (tests, or no server-side tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    async def tokenize_chat(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> TokenizedChat:
        ids = self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=False,
        )
        return TokenizedChat(ids=list(ids), max_model_len=getattr(self.tokenizer, "model_max_length", None))


def _tool_calls_of(assistant: Message) -> dict[str, Any]:
    # Some templates check that tool results answer calls of the preceding turn.
    return {"tool_calls": assistant["tool_calls"]} if assistant.get("tool_calls") else {}


def _nth_index(ids: list[int], token: int, n: int) -> int | None:
    """Index of the ``n``-th (0-based) occurrence of ``token`` in ``ids``."""
    seen = 0
    for index, value in enumerate(ids):
        if value == token:
            if seen == n:
                return index
            seen += 1
    return None
