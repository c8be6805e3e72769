"""The start-up check of the endpoint: each way it cannot serve ``rlbus synthesize`` is named.

The server's answers come from ``httpx.MockTransport``; nothing listening is a real closed port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from rlbus.errors import UserError
from rlbus.services.synthesize.endpoint import check_endpoint, pick_model
from tests.conftest import free_tcp_port

BASE = "http://serving.test:8000/v1"
MODELS = {"object": "list", "data": [{"id": "tiny", "object": "model"}]}


def vllm_like(models: httpx.Response | None = None, tokenize: httpx.Response | None = None,
              seen: list[httpx.Request] | None = None) -> Callable[[httpx.Request], httpx.Response]:  # fmt: skip
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/v1/models":
            return models or httpx.Response(200, json=MODELS)
        if request.url.path == "/tokenize":
            return tokenize or httpx.Response(200, json={"tokens": [1, 2, 3], "max_model_len": 1024})
        return httpx.Response(404)

    return answer


def check(answer: Callable[[httpx.Request], httpx.Response], model: str | None = None) -> str:
    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await check_endpoint(http, BASE, model)

    return asyncio.run(go())


def test_a_vllm_server_passes_and_names_its_model():
    seen: list[httpx.Request] = []
    assert check(vllm_like(seen=seen)) == "tiny"
    assert [str(r.url) for r in seen] == [f"{BASE}/models", "http://serving.test:8000/tokenize"]
    assert json.loads(seen[1].content)["model"] == "tiny"
    assert check(vllm_like(), model="tiny") == "tiny"


@pytest.mark.parametrize(
    ("served", "model", "error"),
    [
        (["a", "b"], None, r"serves 2 models \(\['a', 'b'\]\): pick one with --model"),
        ([], None, r"serves 0 models"),
        (["a"], "b", r"model 'b' is not served at .* \(it serves \['a'\]\): fix --model"),
    ],
)
def test_the_model_must_be_one_the_endpoint_serves(served, model, error):
    with pytest.raises(UserError, match=error):
        pick_model(BASE, served, model)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (vllm_like(models=httpx.Response(401, json={"error": "no key"})), r"/v1/models refused the API key \(401\)"),
        (vllm_like(models=httpx.Response(200, text="<html>hi</html>")), r"/v1/models answered 200 without a model list"),
        (vllm_like(models=httpx.Response(500, text="boom")), r"/v1/models answered 500: 'boom'"),
        (vllm_like(tokenize=httpx.Response(404, json={"detail": "Not Found"})),
         r"/tokenize answered 404: .* needs a vLLM server there \(rlbus inference or vllm serve\), not a chat-only API"),
        (vllm_like(tokenize=httpx.Response(200, json={"count": 3})), r"/tokenize answered 200 without a token list"),
    ],
)  # fmt: skip
def test_an_endpoint_that_cannot_serve_synthesize_is_named(answer, error):
    with pytest.raises(UserError, match=error):
        check(answer)


def test_nothing_listening_is_named_with_the_url():
    url = f"http://127.0.0.1:{free_tcp_port()}/v1"

    async def go() -> str:
        async with httpx.AsyncClient() as http:
            return await check_endpoint(http, url, None)

    with pytest.raises(UserError, match=rf"cannot reach the endpoint {url}/models \(ConnectError"):
        asyncio.run(go())
