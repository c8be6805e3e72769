"""Token-in/token-out rendering against the tiny model's real chat template."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rlbus.environments import tool_schema
from rlbus.services.env_worker.tokens import HFChatTokenizer, TemplateError, TurnRenderer


def calculate(expression: str) -> str:
    """Evaluate an expression."""
    return expression


def test_prompt_is_the_rendered_chat(tokenizer: Any, renderer: TurnRenderer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = asyncio.run(renderer.prompt(messages, []))
    assert prompt.ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(prompt.ids).endswith("<|im_start|>assistant\n")


def test_closing_of_an_assistant_turn(tokenizer: Any, renderer: TurnRenderer) -> None:
    closing = asyncio.run(renderer.closing([]))
    assert tokenizer.decode(list(closing.ids)) == "<|im_end|>\n"
    assert closing.end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("ended_turn", [True, False])
def test_continuation_appends_exactly_what_a_full_render_adds(tokenizer: Any, renderer: TurnRenderer,
                                                               ended_turn: bool) -> None:  # fmt: skip
    history = [{"role": "user", "content": "guess"}]
    prompt = asyncio.run(renderer.prompt(history, [])).ids
    completion = tokenizer.encode("<guess>5</guess>", add_special_tokens=False)
    if ended_turn:
        completion.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assistant = {"role": "assistant", "content": "<guess>5</guess>"}
    reply = [{"role": "user", "content": "Higher."}]
    segment = asyncio.run(renderer.continuation(assistant, reply, [], completion))
    full = tokenizer.apply_chat_template(history + [assistant] + reply, add_generation_prompt=True, return_dict=False)
    assert prompt + completion + segment == full


def test_tool_results_are_rendered_as_their_own_segment(tokenizer: Any, renderer: TurnRenderer) -> None:
    tools = [tool_schema(calculate)]
    history = [{"role": "user", "content": "2+2?"}]
    prompt = asyncio.run(renderer.prompt(history, tools)).ids
    text = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "2+2"}}\n</tool_call>'
    completion = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculate", "arguments": '{"expression": "2+2"}'}}  # fmt: skip
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    reply = [{"role": "tool", "tool_call_id": "call_0", "content": "4"}]
    segment = asyncio.run(renderer.continuation(assistant, reply, tools, completion))
    assert tokenizer.decode(segment) == "\n<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(history + [assistant] + reply, tools=tools, add_generation_prompt=True,
                                         return_dict=False)  # fmt: skip
    assert prompt + completion + segment == full


def test_a_template_that_never_closes_a_turn_is_refused(tokenizer: Any) -> None:
    # Without a token that ends an assistant turn there is nothing to cut a segment at.
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    renderer = TurnRenderer(HFChatTokenizer(_with_template(tokenizer, template)))
    with pytest.raises(TemplateError, match="cannot find how the chat template closes an assistant turn"):
        asyncio.run(renderer.continuation({"role": "assistant", "content": "a"}, [{"role": "user", "content": "b"}],
                                          [], [1]))  # fmt: skip


def _with_template(tokenizer: Any, template: str) -> Any:
    from rlbus.services.models.tokenizer import build_tokenizer

    other = build_tokenizer()
    other.chat_template = template
    return other
