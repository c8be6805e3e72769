"""``POST /rlbus/load_lora`` loads adapters from ``inference.lora_dir`` only."""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from rlbus.services.inference.gate import AdmissionGate
from rlbus.services.inference.http import LoraPathRefused, checked_lora_path, install
from rlbus.services.inference.policy import PolicyTracker


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    (tmp_path / "loras" / "adapter").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "loras"


def test_a_path_inside_lora_dir_resolves(lora_dir):
    assert checked_lora_path(str(lora_dir / "adapter"), lora_dir) == (lora_dir / "adapter").resolve()
    assert checked_lora_path(str(lora_dir / "x" / ".." / "adapter"), lora_dir) == (lora_dir / "adapter").resolve()


@pytest.mark.parametrize("name", ["../elsewhere", "adapter/../../elsewhere", "."])
def test_paths_leaving_lora_dir_are_refused(lora_dir, name):
    with pytest.raises(LoraPathRefused, match="outside inference.lora_dir"):
        checked_lora_path(str(lora_dir / name), lora_dir)
    with pytest.raises(LoraPathRefused, match="outside inference.lora_dir"):
        checked_lora_path("/etc", lora_dir)


def test_a_symlink_out_of_lora_dir_is_refused(lora_dir):
    (lora_dir / "sneaky").symlink_to(lora_dir.parent / "elsewhere")
    with pytest.raises(LoraPathRefused, match="outside inference.lora_dir"):
        checked_lora_path(str(lora_dir / "sneaky"), lora_dir)


@pytest.mark.parametrize("name", ["org/adapter", "adapter", "./adapter"])
def test_hub_ids_and_relative_paths_are_refused(lora_dir, name):
    with pytest.raises(LoraPathRefused, match="absolute path") as error:
        checked_lora_path(name, lora_dir)
    assert error.value.status == 400


def test_without_lora_dir_loading_by_http_is_refused(lora_dir):
    with pytest.raises(LoraPathRefused, match="set inference.lora_dir") as error:
        checked_lora_path(str(lora_dir / "adapter"), None)
    assert error.value.status == 403


class FakeLoraRequest(msgspec.Struct):
    """vLLM's LoRARequest (a msgspec struct), as far as the route uses it."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class FakeModels:
    """vLLM's OpenAIServingModels, as far as the route uses it: it keeps the request as given."""

    def __init__(self) -> None:
        self.loaded: list = []
        self.lora_requests: dict[str, FakeLoraRequest] = {}

    async def load_lora_adapter(self, request):
        self.loaded.append((request.lora_name, request.lora_path))
        self.lora_requests[request.lora_name] = FakeLoraRequest(request.lora_name, request.lora_path,
                                                                request.load_inplace)  # fmt: skip
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."


@pytest.fixture
def fake_vllm_protocol(monkeypatch):
    """The one vLLM class the route imports, so the route runs without vLLM."""
    module = types.ModuleType("vllm.entrypoints.serve.lora.protocol")
    module.LoadLoRAAdapterRequest = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.serve.lora.protocol", module)


def post_lora(lora_dir: Path | None, body: dict) -> tuple[httpx.Response, FakeModels]:
    models = FakeModels()

    async def scenario():
        app = FastAPI()
        app.state.vllm_config = SimpleNamespace(lora_config=object())
        app.state.openai_serving_models = models
        replica = SimpleNamespace(replica_id="r", tracker=PolicyTracker(), gate=AdmissionGate())
        install(app, replica, None, lora_dir=lora_dir)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.post("/rlbus/load_lora", json=body)

    return asyncio.run(asyncio.wait_for(scenario(), 30)), models


def test_the_route_loads_an_adapter_inside_lora_dir(lora_dir, fake_vllm_protocol):
    response, models = post_lora(lora_dir, {"lora_name": "a", "lora_path": str(lora_dir / "adapter")})
    assert response.status_code == 200, response.text
    assert models.loaded == [("a", str((lora_dir / "adapter").resolve()))]
    # Loaded in place once; completions naming it must not make every engine step read it again.
    assert models.lora_requests["a"].load_inplace is False


@pytest.mark.parametrize(
    ("configured", "path", "status", "message"),
    [
        (True, "/etc", 403, "outside inference.lora_dir"),
        (True, "org/adapter", 400, "absolute path"),
        (False, "/etc", 403, "set inference.lora_dir"),
    ],
)
def test_the_route_refuses_with_a_json_error(lora_dir, fake_vllm_protocol, configured, path, status, message):
    response, models = post_lora(lora_dir if configured else None, {"lora_name": "a", "lora_path": path})
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert models.loaded == []
