"""The model endpoint env servers call back: real HTTP (aiohttp server, httpx and OpenAI SDK clients),
the tiny model's real tokenizer, a scripted sampler."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from rlbus.messages import RolloutTask, SamplingParams
from rlbus.services.env_worker.inference import InferenceRefused
from rlbus.services.env_worker.model_endpoint import (
    SECRET_HEADER,
    Answered,
    CallLog,
    ModelEndpoint,
    continued_call,
    message_key,
)
from rlbus.services.env_worker.verifiers_client import TokenSampler

KEY = "rlbus/t/0"
SYSTEM = {"role": "system", "content": "Play."}
USER = {"role": "user", "content": "Move?"}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object"}}}]


def task() -> RolloutTask:
    return RolloutTask(task_id="t", env_id="verifiers:x", example_id=0, num_rollouts=1,
                       sampling=SamplingParams(max_tokens=16), lease_s=60, issued_at=time.time())  # fmt: skip


def serve(sampler: Any, renderer: Any, check: Callable[[ModelEndpoint, httpx.AsyncClient], Awaitable[None]]) -> None:
    """Run ``check`` against a started endpoint with one registered rollout (``KEY``)."""

    async def main() -> None:
        endpoint = ModelEndpoint(TokenSampler(sampler, renderer))
        await endpoint.start("127.0.0.1")
        endpoint.begin(KEY, task(), 0)
        try:
            async with httpx.AsyncClient(base_url=endpoint.url, headers={SECRET_HEADER: endpoint.secret}) as http:
                await check(endpoint, http)
        finally:
            await endpoint.stop()

    asyncio.run(main())


def test_a_call_continues_the_longest_answered_prefix() -> None:
    reply = {"role": "assistant", "content": "[E]"}
    first = Answered([message_key(m) for m in (SYSTEM, USER, reply)], [1, 2, 3])
    log = CallLog([first, Answered([*first.path, message_key(USER), message_key(reply)], [1, 2, 3, 4, 5])])
    # The SDK re-sends the reply with bookkeeping fields and content as parts: the same message.
    resent = {"role": "assistant", "content": [{"type": "text", "text": "[E]"}], "refusal": None}
    assert continued_call(log, [SYSTEM, USER, resent, USER, reply, USER]) == ([1, 2, 3, 4, 5], 5)
    assert continued_call(log, [SYSTEM, USER, resent, {"role": "user", "content": "Again"}]) == ([1, 2, 3], 3)
    # Edited history, or the very messages of an answered call: no continuation.
    assert continued_call(log, [SYSTEM, USER, {"role": "assistant", "content": "[A]"}, USER]) == (None, 0)
    assert continued_call(log, [SYSTEM, USER, reply]) == (None, 0)
    call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    other = {**call, "function": {"name": "add", "arguments": '{"a": 2}'}}
    assert message_key({"role": "assistant", "content": None, "tool_calls": [call]}) != message_key(
        {"role": "assistant", "content": None, "tool_calls": [other]}
    )


def test_streamed_turns_append_only_the_new_segment(scripted, renderer, tokenizer) -> None:
    from openai import AsyncOpenAI

    sampler = scripted(lambda prompt, seed: "[E]")

    async def check(endpoint: ModelEndpoint, http: httpx.AsyncClient) -> None:
        # The harness's own client: the OpenAI SDK, streaming, as verifiers' chat program calls it.
        client = AsyncOpenAI(base_url=endpoint.url, api_key="unused", default_headers={SECRET_HEADER: endpoint.secret})
        messages = [SYSTEM, USER]
        for _ in range(2):
            stream = await client.chat.completions.create(model=KEY, messages=messages, stream=True,
                                                          stream_options={"include_usage": True})  # fmt: skip
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "[E]" and chunks[-1].usage.completion_tokens == 4  # [, E, ], <|im_end|>
            messages = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "Again."}]
        record = endpoint.finish(KEY)
        (branch,) = record.branches
        first, second = branch.turns
        assert sampler.prompts[1] == sampler.prompts[0] + first.completion_ids + second.prompt_ids
        assert tokenizer.decode(second.prompt_ids) == "\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"
        assert [t.policy_step for t in branch.turns] == [3, 3] and len(second.completion_logprobs) == 4
        await client.close()

    serve(sampler, renderer, check)


def test_tool_calls_come_back_parsed_and_their_results_continue_the_branch(scripted, renderer) -> None:
    ChatStreamParser = pytest.importorskip("verifiers.v1.dialects.chat", reason="needs verifiers 0.4").ChatStreamParser
    replies = iter(['<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "2"])
    sampler = scripted(lambda prompt, seed: next(replies))

    async def check(endpoint: ModelEndpoint, http: httpx.AsyncClient) -> None:
        body = {"model": KEY, "messages": [USER], "tools": TOOLS, "stream": True}
        # A verifiers env server reads a relayed stream with its chat dialect's parser.
        parser = ChatStreamParser()
        for event in (await http.post("/chat/completions", json=body)).content.split(b"\n\n"):
            parser.feed(event + b"\n\n")
        response = parser.finish()
        assert response.finish_reason == "tool_calls" and not response.message.content
        (call,) = response.message.tool_calls
        assert (call.name, call.arguments) == ("add", '{"a": 1}')
        reply = {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
                                                      "function": {"name": "add", "arguments": '{"a": 1}'}}]}  # fmt: skip
        result = {"role": "tool", "tool_call_id": call.id, "content": "1"}
        body = {"model": KEY, "messages": [USER, reply, result], "tools": TOOLS}
        second = (await http.post("/chat/completions", json=body)).json()["choices"][0]
        assert second["message"] == {"role": "assistant", "content": "2"} and second["finish_reason"] == "stop"
        assert len(endpoint.finish(KEY).branches) == 1

    serve(sampler, renderer, check)


def test_an_edited_history_starts_a_second_branch(scripted, renderer) -> None:
    sampler = scripted(lambda prompt, seed: "[E]")

    async def check(endpoint: ModelEndpoint, http: httpx.AsyncClient) -> None:
        await http.post("/chat/completions", json={"model": KEY, "messages": [USER]})
        summarised = [{"role": "user", "content": "Summary: you said [E]."}, USER]
        await http.post("/chat/completions", json={"model": KEY, "messages": summarised})
        assert len(endpoint.finish(KEY).branches) == 2

    serve(sampler, renderer, check)


@pytest.mark.parametrize(
    ("headers", "body", "status", "words"),
    [
        ({SECRET_HEADER: "guess"}, {"model": KEY, "messages": [USER]}, 401, SECRET_HEADER),
        ({}, {"model": "rlbus/other/0", "messages": [USER]}, 404, "rlbus/other/0"),
        ({}, {"model": KEY, "messages": []}, 400, "messages"),
        ({}, {"model": KEY, "messages": [{"content": "no role"}]}, 400, "role"),
        ({}, ["not", "an", "object"], 400, "model"),
    ],
)
def test_bad_requests_get_a_clear_error(scripted, renderer, headers, body, status, words) -> None:
    async def check(endpoint: ModelEndpoint, http: httpx.AsyncClient) -> None:
        answer = await http.post("/chat/completions", json=body, headers=headers)
        assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
        assert endpoint.finish(KEY).branches == []

    serve(scripted(lambda p, s: "x"), renderer, check)


def test_a_refused_inference_request_is_a_400_naming_why(renderer) -> None:
    class Refusing:
        async def complete(self, prompt_ids, sampling, max_tokens, seed=None):
            raise InferenceRefused("prompt of 9999 tokens is longer than max_model_len=2048")

    async def check(endpoint: ModelEndpoint, http: httpx.AsyncClient) -> None:
        answer = await http.post("/chat/completions", content=json.dumps({"model": KEY, "messages": [USER]}))
        assert answer.status_code == 400 and "max_model_len=2048" in answer.json()["error"]["message"]

    serve(Refusing(), renderer, check)
