"""SFT examples as tokens with a loss mask, packed into rows for :class:`TrainStep`.

Forms of an example (messages win when both are present):

* ``messages``: a chat; messages whose role is in ``train_on_roles`` are trained on.
* ``prompt`` + ``completion``: strings (plain text, EOS appended to the completion)
  or lists of messages (rendered with the chat template; the prompt is never
  trained on, completion messages are when their role is in ``train_on_roles``).

Chats are rendered with the tokenizer's chat template (``tools`` passed along)
one message at a time: each message's share is the text it adds to the rendering
of the messages before it, and a trained message's turn header (the generation
prompt, e.g. ``<|im_start|>assistant\\n``) stays untrained; other trained roles
train their whole turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlbus.errors import UserError
from rlbus.packing import deal_to_ranks, first_fit_decreasing
from rlbus.services.trainer.data.loading import Row
from rlbus.services.trainer.sft_config import SftDataConfig


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[bool]

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


class SampleBuilder:
    """Turns rows into :class:`Sample` with a tokenizer (HF tokenizer with a chat template)."""

    def __init__(self, tokenizer: Any, config: SftDataConfig, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_tokens = max_tokens
        self.num_truncated = 0

    def build(self, row: Row) -> Sample:
        pieces = self.pieces(row)
        ids: list[int] = []
        mask: list[bool] = []
        for text, trained in pieces:
            piece_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mask += [trained] * len(piece_ids)
        if len(ids) > self.max_tokens:
            self.num_truncated += 1
            ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
        if mask:
            mask[0] = False  # the first token has nothing to be predicted from
        return Sample(ids, mask)

    def pieces(self, row: Row) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the whole example."""
        config = self.config
        tools = _tools(row.get(config.tools_column))
        if row.get(config.messages_column):
            messages = list(row[config.messages_column])
            return self.chat_pieces(messages, [m["role"] in config.train_on_roles for m in messages], tools)
        prompt, completion = row.get(config.prompt_column), row.get(config.completion_column)
        if prompt is None or completion is None:
            raise UserError(f"SFT example has neither {config.messages_column!r} nor {config.prompt_column!r} and "
                            f"{config.completion_column!r}; its keys are {sorted(row)} (set data.messages_column, "
                            "data.prompt_column and data.completion_column)")  # fmt: skip
        if isinstance(prompt, str) and isinstance(completion, str):
            return [(prompt, False), (completion + (self.tokenizer.eos_token or ""), True)]
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        completion_messages = (
            [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
        )
        trained = [False] * len(prompt_messages) + [m["role"] in config.train_on_roles for m in completion_messages]
        return self.chat_pieces(prompt_messages + completion_messages, trained, tools)

    def chat_pieces(self, messages: list[dict], trained: list[bool], tools: list | None) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        rendered = ""
        for index, is_trained in enumerate(trained):
            text = self._render(messages[: index + 1], tools, generation_prompt=False)
            if is_trained and index > 0 and messages[index]["role"] == "assistant":
                # The turn header is what the generation prompt adds; the model never produces it.
                header = self._render(messages[:index], tools, generation_prompt=True)
                if text.startswith(header):
                    pieces.append((self._delta(rendered, header), False))
                    rendered = header
            pieces.append((self._delta(rendered, text), is_trained))
            rendered = text
        return [(text, is_trained) for text, is_trained in pieces if text]

    def _render(self, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)  # fmt: skip

    @staticmethod
    def _delta(before: str, after: str) -> str:
        if not after.startswith(before):
            raise ValueError("the chat template does not render messages incrementally (a later message changes "
                             f"the text of earlier ones): {before[-60:]!r} vs {after[:len(before)][-60:]!r}")
        return after[len(before):]


def _tools(value: Any) -> list | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return json.loads(value)
    return list(value)


@dataclass
class PackedRow:
    """One micro-batch: samples back to back, positions restarting per sample."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    loss_mask: np.ndarray


def pack(samples: list[Sample], seq_len: int) -> list[PackedRow]:
    """First-fit-decreasing (:func:`rlbus.packing.first_fit_decreasing`): rows of at most ``seq_len`` tokens."""
    bins = first_fit_decreasing([len(s.input_ids) for s in samples], seq_len)
    return [_row([samples[i] for i in indices]) for indices in bins]


def _row(group: list[Sample]) -> PackedRow:
    return PackedRow(
        input_ids=np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in group]),
        position_ids=np.concatenate([np.arange(len(s.input_ids), dtype=np.int64) for s in group]),
        loss_mask=np.concatenate([np.asarray(s.loss_mask, dtype=bool) for s in group]),
    )


def split_for_ranks(rows: list[PackedRow], world_size: int, pad_id: int) -> list[list[PackedRow]]:
    """Rows per rank, balanced by tokens, the same count on every rank (padded with zero-loss rows)."""
    shares = [[rows[i] for i in indices] for indices in deal_to_ranks([r.input_ids.size for r in rows], world_size)]
    count = max(len(share) for share in shares)
    padding = PackedRow(np.full(1, pad_id, np.int64), np.zeros(1, np.int64), np.zeros(1, bool))
    return [share + [padding] * (count - len(share)) for share in shares]
