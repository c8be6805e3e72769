"""rlbus routes and middleware on a small FastAPI app standing in for vLLM's (no engine)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from rlbus.services.inference.gate import AdmissionGate
from rlbus.services.inference.http import install, tag_json, tag_sse
from rlbus.services.inference.policy import LoadReport, PolicyTracker

KEY = "sekret"


class FakeReplica:
    """The ReplicaControl the routes use, with a tracker and gate driven by the test."""

    def __init__(self) -> None:
        self.replica_id = "replica-t"
        self.tracker = PolicyTracker()
        self.gate = AdmissionGate()
        self.dead = False
        self.reloads = 0

    async def reload_base(self) -> LoadReport:
        self.reloads += 1
        self.tracker.loaded(0, 1.0, "base")
        return LoadReport(ok=True, step=0, load_s=0.25)

    def engine_dead(self) -> bool:
        return self.dead


def vllm_like_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def vllm_health():
        return JSONResponse({"vllm": True})

    @app.post("/v1/completions")
    async def completions():
        return JSONResponse({"id": "cmpl-1", "choices": [{"text": "hi", "token_ids": [1, 2]}]})

    @app.post("/v1/chat/completions")
    async def stream():
        async def events():
            yield b'data: {"id":"c","choices":[]}\n\n'
            yield b'data: {"id":"c","choices":[{"delta":{"content":"data: {x}"}}]}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/bad")
    async def bad():
        return JSONResponse({"error": {"message": "no"}}, status_code=400)

    return app


def call(replica: FakeReplica, method: str, path: str, api_key: str | None = None, **kwargs) -> httpx.Response:
    async def scenario():
        app = vllm_like_app()
        app.state.vllm_config = None
        install(app, replica, api_key)
        await replica.gate.open(replica.tracker.step)  # on this test's event loop
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.fixture
def replica() -> FakeReplica:
    replica = FakeReplica()
    replica.tracker.loaded(7, 70.0, "trainer")
    return replica


def test_completions_carry_the_policy_step_in_body_and_header(replica):
    response = call(replica, "POST", "/v1/completions", json={})
    assert response.status_code == 200 and response.headers["x-policy-step"] == "7"
    body = response.json()
    assert body["policy_step"] == 7 and body["choices"][0]["token_ids"] == [1, 2]
    assert int(response.headers["content-length"]) == len(response.content)


def test_every_sse_event_carries_the_policy_step(replica):
    response = call(replica, "POST", "/v1/chat/completions", json={})
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(event) for event in events[:-1]]
    assert [event["policy_step"] for event in parsed] == [7, 7]
    assert parsed[1]["choices"][0]["delta"]["content"] == "data: {x}", "text inside JSON strings is untouched"


def test_error_bodies_are_passed_through_with_the_header_only(replica):
    response = call(replica, "POST", "/v1/bad", json={})
    assert response.status_code == 400 and response.json() == {"error": {"message": "no"}}
    assert response.headers["x-policy-step"] == "7"


def test_health_reports_step_and_readiness(replica):
    response = call(replica, "GET", "/health")
    assert response.status_code == 200
    assert response.json() | {"loaded_at": None} == {
        "ready": True, "state": "ready", "replica_id": "replica-t", "policy_step": 7, "source": "trainer",
        "loaded_at": None, "last_error": None, "requests_running": 0, "requests_waiting": 0,
    }  # fmt: skip


def test_health_is_503_while_starting_swapping_or_after_engine_death():
    starting = FakeReplica()
    assert call(starting, "GET", "/health").status_code == 503
    swapping = FakeReplica()
    swapping.tracker.loaded(1, 1.0, "trainer")
    swapping.tracker.begin_swap()
    response = call(swapping, "GET", "/health")
    assert response.status_code == 503 and response.json()["state"] == "swapping"
    dead = FakeReplica()
    dead.tracker.loaded(1, 1.0, "trainer")
    dead.dead = True
    assert call(dead, "GET", "/health").json()["state"] == "engine_dead"


def test_api_key_is_required_except_on_health(replica):
    assert call(replica, "POST", "/v1/completions", api_key=KEY, json={}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert call(replica, "POST", "/v1/completions", api_key=KEY, json={}, headers=wrong).status_code == 401
    right = {"Authorization": f"Bearer {KEY}"}
    assert call(replica, "POST", "/v1/completions", api_key=KEY, json={}, headers=right).status_code == 200
    assert call(replica, "POST", "/rlbus/reload_weights", api_key=KEY).status_code == 401
    assert call(replica, "GET", "/health", api_key=KEY).status_code == 200
    assert "API key" in call(replica, "POST", "/v1/completions", api_key=KEY).json()["error"]["message"]


def test_reload_route_reloads_the_base_weights(replica):
    response = call(replica, "POST", "/rlbus/reload_weights")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "policy_step": 0, "seconds": 0.25, "error": None}
    assert replica.reloads == 1


def test_load_lora_is_refused_with_a_message_when_lora_is_off(replica):
    response = call(replica, "POST", "/rlbus/load_lora", json={"lora_name": "a", "lora_path": "/x"})
    assert response.status_code == 400 and "enable_lora" in response.json()["error"]["message"]
    assert 400 <= call(replica, "POST", "/rlbus/load_lora", json={"lora_name": "a"}).status_code < 500


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a":1}', b'{"policy_step":3,"a":1}'),
        (b'  {\n"a":1}', b'{"policy_step":3,\n"a":1}'),
        (b"{}", b"{}"),
        (b"[1,2]", b"[1,2]"),
    ],
)
def test_tag_json(body, expected):
    assert tag_json(body, 3) == expected


def test_tag_sse_tags_only_event_starts():
    chunk = b'data: {"a":"\\ndata: {"}\n\ndata: {}\n\ndata: [DONE]\n\n'
    assert tag_sse(chunk, 2) == b'data: {"policy_step":2,"a":"\\ndata: {"}\n\ndata: {}\n\ndata: [DONE]\n\n'
