"""The inference client against real HTTP servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rlbus.messages import SamplingParams
from rlbus.services.env_worker.inference import InferenceClient, InferenceError, InferenceRefused, InferenceUnavailable
from tests.conftest import free_tcp_port

COMPLETION = {"choices": [{"text": "hi", "token_ids": [104, 105], "finish_reason": "stop",
                           "prompt_token_ids": [1, 2], "logprobs": {"token_logprobs": [-0.5, -0.25]}}]}  # fmt: skip


class ScriptedServer:
    """An HTTP server answering each POST with the next scripted (status, body, headers)."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any, dict[str, str]]] = []
        self.health = 200
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                status, reply, headers = server.script.pop(0) if server.script else (200, COMPLETION, {})
                self._answer(status, reply, headers)

            def do_GET(self) -> None:
                server.requests.append((self.path, {}))
                self._answer(server.health, {"ready": server.health == 200}, {})

            def _answer(self, status: int, reply: Any, headers: dict[str, str]) -> None:
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def posts(self) -> list[str]:
        return [path for path, body in self.requests if body]


@pytest.fixture
def servers() -> Iterator[list[ScriptedServer]]:
    started = [ScriptedServer(), ScriptedServer()]
    yield started
    for server in started:
        server.close()


def client(urls: list[str], **kwargs: Any) -> InferenceClient:
    return InferenceClient(urls, backoff_s=0.01, max_backoff_s=0.05, request_timeout_s=30, **kwargs)


def complete(inference: InferenceClient, seed: int | None = None) -> Any:
    async def run() -> Any:
        try:
            return await inference.complete([1, 2], SamplingParams(temperature=0.7, stop=["\n"]), 16, seed)
        finally:
            await inference.close()

    return asyncio.run(run())


def test_a_completion_carries_tokens_logprobs_and_the_policy_step(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(200, COMPLETION, {"X-Policy-Step": "7"})]
    completion = complete(client([server.url], api_key="k", model="policy"), seed=5)
    assert (completion.token_ids, completion.logprobs, completion.text) == ([104, 105], [-0.5, -0.25], "hi")
    assert completion.policy_step == 7 and completion.prompt_token_ids == [1, 2]
    path, body = server.requests[0]
    assert path == "/v1/completions"
    assert body == {"prompt": [1, 2], "max_tokens": 16, "temperature": 0.7, "top_p": 1.0, "logprobs": 0,
                    "return_token_ids": True, "n": 1, "stop": ["\n"], "seed": 5, "model": "policy"}  # fmt: skip


def choice(index: int, token: int) -> dict[str, Any]:
    return {"index": index, "text": chr(token), "token_ids": [token], "finish_reason": "stop",
            "prompt_token_ids": [1, 2], "logprobs": {"token_logprobs": [-0.5]}}  # fmt: skip


def test_a_group_is_sampled_in_one_request_and_choices_come_back_in_index_order(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(200, {"choices": [choice(2, 99), choice(0, 97), choice(1, 98)]}, {"X-Policy-Step": "4"})]
    inference = client([server.url])

    async def run() -> Any:
        try:
            return await inference.complete_n([1, 2], SamplingParams(), 8, 3, seed=11)
        finally:
            await inference.close()

    completions = asyncio.run(run())
    assert [c.token_ids for c in completions] == [[97], [98], [99]] and {c.policy_step for c in completions} == {4}
    assert server.posts() == ["/v1/completions"] and server.requests[0][1]["n"] == 3


def test_a_group_answer_with_the_wrong_number_of_choices_is_an_error(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(200, {"choices": [choice(0, 97)]}, {})]
    inference = client([server.url])

    async def run() -> Any:
        try:
            return await inference.complete_n([1, 2], SamplingParams(), 8, 2)
        finally:
            await inference.close()

    with pytest.raises(InferenceError, match="asked for 2 choice"):
        asyncio.run(run())


def test_the_policy_step_may_come_in_the_body_and_defaults_to_zero(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(200, {**COMPLETION, "policy_step": 4}, {}), (200, COMPLETION, {})]
    assert complete(client([server.url])).policy_step == 4
    assert complete(client([server.url])).policy_step == 0


def test_5xx_and_429_are_retried_with_backoff(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(503, {"error": "busy"}, {}), (429, {"error": "slow down"}, {})]
    inference = client([server.url])
    assert complete(inference).text == "hi"
    assert server.posts() == ["/v1/completions"] * 3 and inference.stats.retries == 2


def test_a_4xx_answer_is_not_retried(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(400, {"error": "prompt too long"}, {})]
    with pytest.raises(InferenceRefused, match="answered 400: .*prompt too long"):
        complete(client([server.url]))
    assert len(server.posts()) == 1


def test_a_dead_replica_is_set_aside_and_the_other_serves(servers: list[ScriptedServer]) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}/v1"
    inference = client([dead, servers[0].url])

    async def run() -> list[Any]:
        try:
            return [await inference.complete([1, 2], SamplingParams(), 4) for _ in range(5)]
        finally:
            await inference.close()

    assert len(asyncio.run(run())) == 5
    assert inference.stats.retries <= 2  # the dead one is tried at most once or twice, then avoided
    assert len(servers[0].posts()) == 5


def test_an_unhealthy_replica_returns_after_its_health_check_passes(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(500, {"error": "engine died"}, {})]
    server.health = 503
    inference = client([server.url], max_retries=0)

    async def run() -> tuple[bool, bool]:
        try:
            with pytest.raises(InferenceUnavailable, match="answered 500"):
                await inference.complete([1], SamplingParams(), 4)
            failed_probe = await inference.probe(inference.replicas[0])
            server.health = 200
            good_probe = await inference.probe(inference.replicas[0])
            await inference.complete([1], SamplingParams(), 4)
            return failed_probe, good_probe
        finally:
            await inference.close()

    assert asyncio.run(run()) == (False, True)
    assert ("/health", {}) in server.requests and inference.num_unhealthy == 0


def test_every_attempt_failing_raises_with_the_reasons(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(502, {"error": "bad gateway"}, {})] * 3
    with pytest.raises(InferenceUnavailable, match="failed 3 time\\(s\\).*answered 502"):
        complete(client([server.url], max_retries=2))


def test_malformed_answers_are_errors(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    no_ids = {"choices": [{"text": "hi", "logprobs": {"token_logprobs": [-1.0]}}]}
    short = {"choices": [{"text": "hi", "token_ids": [1, 2], "logprobs": {"token_logprobs": [-1.0]}}]}
    server.script = [(200, b"not json", {}), (200, no_ids, {}), (200, short, {})]
    for expected in ("not JSON", "without choices\\[i\\].token_ids", "2 tokens but logprobs"):
        with pytest.raises(InferenceError, match=expected):
            complete(client([server.url]))


def test_chat_is_tokenized_at_the_server_root(servers: list[ScriptedServer]) -> None:
    server = servers[0]
    server.script = [(200, {"tokens": [1, 2, 3], "count": 3, "max_model_len": 512}, {})]
    inference = client([server.url + "/"])
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> Any:
        try:
            return await inference.tokenize_chat(messages, [], add_generation_prompt=True)
        finally:
            await inference.close()

    tokenized = asyncio.run(run())
    assert (tokenized.ids, tokenized.max_model_len) == ([1, 2, 3], 512)
    assert server.requests[0] == ("/tokenize", {"messages": messages, "add_generation_prompt": True,
                                                "continue_final_message": False})  # fmt: skip


def test_ready_urls_names_only_replicas_whose_health_answers_200(servers: list[ScriptedServer]) -> None:
    starting, ready = servers
    starting.health = 503  # rlbus inference while vLLM starts
    closed = f"http://127.0.0.1:{free_tcp_port()}/v1"  # a plain vLLM server before it listens

    async def run() -> list[str]:
        inference = client([starting.url, closed, ready.url])
        try:
            return await inference.ready_urls()
        finally:
            await inference.close()

    assert asyncio.run(run()) == [ready.url]
    assert starting.requests == [("/health", {})] and ready.requests == [("/health", {})]
