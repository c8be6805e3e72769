"""What rlbus adds to vLLM's OpenAI server app: health, control routes, API key, policy-step tags.

* ``GET /health``: replaces vLLM's bare 200 with JSON ``{ready, state, policy_step, ...}``;
  200 when ready, 503 while starting, swapping weights or when the engine died.
* ``POST /rlbus/reload_weights``: reload the model directory's weights (policy step 0, until the
  trainer's latest step is loaded again, at once).
* ``POST /rlbus/load_lora``: ``{"lora_name", "lora_path"}``, when ``enable_lora`` is set; the path
  must resolve inside ``lora_dir`` (:func:`checked_lora_path`), else 400/403.
* Every POST outside ``/rlbus/`` passes the :class:`AdmissionGate`, so it samples on one
  policy step, reported as the ``X-Policy-Step`` header and as a top-level
  ``"policy_step"`` field of JSON bodies and of every SSE ``data:`` event.
* With an API key, every request but ``GET /health`` and ``GET /metrics`` needs
  ``Authorization: Bearer <key>``; others get 401.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.middleware import Middleware

from rlbus.services.inference.gate import AdmissionGate
from rlbus.services.inference.policy import LoadReport, PolicyTracker

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
CONTROL_PREFIX = "/rlbus/"
OPEN_PATHS = frozenset({"/health", "/metrics"})
STEP_HEADER = b"x-policy-step"


class ReplicaControl(Protocol):
    """What the routes need from the running replica (see rlbus.services.inference.sync)."""

    replica_id: str
    tracker: PolicyTracker
    gate: AdmissionGate

    async def reload_base(self) -> LoadReport: ...

    def engine_dead(self) -> bool: ...


class LoadLoraBody(BaseModel):
    lora_name: str = Field(min_length=1)
    """Name clients then pass as ``model``."""
    lora_path: str = Field(min_length=1)
    """Directory holding ``adapter_config.json`` and the adapter weights, on this host, inside
    ``lora_dir``."""


class LoraPathRefused(ValueError):
    """A ``lora_path`` the route will not hand to vLLM; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def checked_lora_path(lora_path: str, lora_dir: Path | None) -> Path:
    """``lora_path`` resolved (symlinks followed), if it lies inside ``lora_dir``: vLLM would load any
    folder or hub id it is given, so whoever can POST could make it read any file of the host."""
    if lora_dir is None:
        raise LoraPathRefused(403, "loading LoRA adapters over HTTP is off: set inference.lora_dir to the "
                                   "folder adapters are written to")  # fmt: skip
    if not Path(lora_path).is_absolute():
        raise LoraPathRefused(400, f"lora_path {lora_path!r} must be an absolute path inside inference.lora_dir "
                                   "(hub ids and relative paths are refused)")  # fmt: skip
    folder, resolved = lora_dir.resolve(), Path(lora_path).resolve()
    if folder not in resolved.parents:
        raise LoraPathRefused(403, f"lora_path {lora_path!r} resolves to {str(resolved)!r}, outside "
                                   f"inference.lora_dir {str(folder)!r}")  # fmt: skip
    return resolved


router = APIRouter()


def control(request: Request) -> ReplicaControl:
    return request.app.state.rlbus


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Ready or not, and which policy step serves; 503 unless ready."""
    replica = control(request)
    tracker, gate = replica.tracker, replica.gate
    state = "engine_dead" if replica.engine_dead() else tracker.state
    served = tracker.served
    body = {
        "ready": state == "ready" and tracker.ready, "state": state, "replica_id": replica.replica_id,
        "policy_step": tracker.step, "source": served.source if served else None,
        "loaded_at": served.loaded_at if served else None, "last_error": tracker.last_error,
        "requests_running": gate.num_running, "requests_waiting": gate.num_waiting,
    }  # fmt: skip
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.post("/rlbus/reload_weights")
async def reload_weights(request: Request) -> JSONResponse:
    """Reload the weights from the model directory; they serve as policy step 0 until the trainer's
    latest step is loaded again (the replica asks for it at once: a live run is not held back)."""
    report = await control(request).reload_base()
    body = {"ok": report.ok, "policy_step": control(request).tracker.step, "seconds": report.seconds,
            "error": report.error or None}  # fmt: skip
    return JSONResponse(body, status_code=200 if report.ok else 500)


@router.post("/rlbus/load_lora")
async def load_lora(body: LoadLoraBody, request: Request) -> JSONResponse:
    """Load (or replace) a LoRA adapter through vLLM's own model registry."""
    models = getattr(request.app.state, "openai_serving_models", None)
    if models is None or request.app.state.vllm_config.lora_config is None:
        return error_response(400, "LoRA is disabled on this replica; start it with enable_lora = true")
    try:
        path = checked_lora_path(body.lora_path, request.app.state.rlbus_lora_dir)
    except LoraPathRefused as refused:
        return error_response(refused.status, str(refused))
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    result = await models.load_lora_adapter(
        LoadLoRAAdapterRequest(lora_name=body.lora_name, lora_path=str(path), load_inplace=True)
    )
    if isinstance(result, str):
        # vLLM keeps the request with load_inplace for completions, whose every engine step would then
        # read the folder again: the adapter is loaded, completions only need to name it.
        loaded = models.lora_requests[body.lora_name]
        models.lora_requests[body.lora_name] = msgspec.structs.replace(loaded, load_inplace=False)
        return JSONResponse({"loaded": body.lora_name, "message": result})
    # An adapter that does not fit the model is the caller's mistake, not a server error.
    return error_response(400 if result.error.code >= 500 else result.error.code, result.error.message)


def error_response(status: int, message: str) -> JSONResponse:
    """An error body shaped like vLLM's (and OpenAI's)."""
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)


def install(app: FastAPI, replica: ReplicaControl, api_key: str | None, lora_dir: Path | None = None) -> None:
    """Add the rlbus routes and middleware to vLLM's app (before it starts serving)."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    app.include_router(router)
    app.state.rlbus = replica
    app.state.rlbus_lora_dir = lora_dir
    # vLLM's build_app already built the middleware stack (so add_middleware is
    # refused); like its SageMaker bootstrap, we edit the list and rebuild it.
    # Outermost first: the key check runs before anything waits at the gate.
    ours = [Middleware(PolicyStepMiddleware, gate=replica.gate)]
    if api_key:
        ours.insert(0, Middleware(ApiKeyMiddleware, api_key=api_key))
    app.user_middleware[:0] = ours
    app.middleware_stack = app.build_middleware_stack()


class ApiKeyMiddleware:
    """401 for requests without ``Authorization: Bearer <api_key>`` (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._is_open(scope) or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await error_response(401, "missing or wrong API key (Authorization: Bearer <key>)")(scope, receive, send)

    def _is_open(self, scope: dict) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS

    def _authorised(self, scope: dict) -> bool:
        value = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(digest, self._digest)


class PolicyStepMiddleware:
    """Admits each request through the gate and tags its response with the policy step."""

    def __init__(self, app: ASGIApp, gate: AdmissionGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith(CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        # The slot is held until the app returns, i.e. until a stream's last event is sent.
        async with self.gate.admitted() as step:
            await self.app(scope, receive, StepTagger(send, step))


class StepTagger:
    """An ASGI ``send`` that adds the policy step to the response headers and JSON."""

    def __init__(self, send: Callable, step: int) -> None:
        self.send, self.step = send, step
        self.mode = "pass"
        self._start: dict[str, Any] = {}
        self._chunks: list[bytes] = []

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            await self._start_response(message)
        elif message["type"] == "http.response.body" and self.mode == "json":
            await self._buffer_json(message)
        elif message["type"] == "http.response.body" and self.mode == "sse":
            await self.send({**message, "body": tag_sse(message.get("body", b""), self.step)})
        else:
            await self.send(message)

    async def _start_response(self, message: dict) -> None:
        headers = [*message.get("headers", []), (STEP_HEADER, str(self.step).encode())]
        content_type = dict(headers).get(b"content-type", b"")
        if 200 <= message["status"] < 300 and content_type.startswith(b"application/json"):
            # Held back: the body grows, so content-length is only known at the end.
            self.mode, self._start = "json", {**message, "headers": headers}
            return
        if 200 <= message["status"] < 300 and content_type.startswith(b"text/event-stream"):
            self.mode = "sse"
        await self.send({**message, "headers": headers})

    async def _buffer_json(self, message: dict) -> None:
        self._chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = tag_json(b"".join(self._chunks), self.step)
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        await self.send({**self._start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


_JSON_OBJECT = re.compile(rb"^\s*\{(?!\s*\})")
# vLLM sends one whole SSE event per chunk; a ``data: {`` can only start a line
# outside JSON strings, since JSON escapes newlines inside them.
_SSE_OBJECT = re.compile(rb"(?m)^data: ?\{(?!\s*\})")


def tag_json(body: bytes, step: int) -> bytes:
    """``body`` with ``"policy_step": step`` as first field, if it is a non-empty JSON object."""
    return _JSON_OBJECT.sub(b'{"policy_step":%d,' % step, body, count=1)


def tag_sse(chunk: bytes, step: int) -> bytes:
    """Every ``data: {...}`` event of ``chunk`` with ``"policy_step": step`` added."""
    return _SSE_OBJECT.sub(b'data: {"policy_step":%d,' % step, chunk)
