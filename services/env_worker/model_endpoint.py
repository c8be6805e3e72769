"""The model endpoint an env server calls back: OpenAI chat completions, sampled token-in/token-out.

A verifiers env server (:mod:`.verifiers_serve`) runs the episode, so its
harness's model calls reach this worker over HTTP, as ``POST /v1/chat/completions``
relayed unchanged by the server's interception (verifiers' ``EvalClient``). The
request's ``model`` is the rollout's key; each call is sampled by the same
:class:`~rlbus.services.env_worker.verifiers_client.TokenSampler` the in-process
path uses, so the tokens are rlbus's own: the first call renders its messages,
a later one whose messages start with an earlier call's messages and the reply
sent back, followed by tool, user or system messages only, appends just those
messages' segment to the exact tokens sampled before. Any other call starts a
new token branch, which errors the rollout (it says why) rather than train on a
sequence the model never saw.

The HTTP server does not know a request's message graph the way the in-process
client does, so the prefix is found here: every answered call is remembered as
its messages plus the reply, compared on role, text, tool calls and tool call id.

Streaming requests get the whole reply as one chunk of Server-Sent Events. Only
requests carrying this endpoint's secret header (sent with every run) are served.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

from rlbus.curve import is_loopback_host
from rlbus.messages import RolloutTask
from rlbus.services.env_worker.inference import InferenceError
from rlbus.services.env_worker.tokens import TemplateError
from rlbus.services.env_worker.verifiers_client import RolloutTokens, TokenSampler, assistant_reply

SECRET_HEADER = "X-Rlbus-Endpoint-Key"
# Message fields a chat template reads; the rest (refusal, annotations, ...) is SDK bookkeeping.
WIRE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")
MessageKey = tuple[str, str, tuple[tuple[str, str], ...], str]


@dataclass
class Answered:
    """One answered call: the messages it sent and the reply, and the tokens they ended with."""

    path: list[MessageKey]
    ids: list[int]
    """Prompt and completion tokens of the call: where a continuing call's segment goes."""


@dataclass
class CallLog:
    """The answered calls of one rollout, and the ones still sampling."""

    calls: list[Answered] = field(default_factory=list)
    sampling: set[asyncio.Future[Any]] = field(default_factory=set)
    ended: bool = False


class ModelEndpoint:
    """A chat-completions endpoint serving the registered rollouts of one environment."""

    def __init__(self, tokens: TokenSampler) -> None:
        self.tokens = tokens
        self.secret = secrets.token_urlsafe(24)
        self.logs: dict[str, CallLog] = {}
        self.url: str | None = None
        """``http://host:port/v1`` as env servers call it, once started."""
        self._runner: web.AppRunner | None = None

    async def start(self, advertised_host: str) -> str:
        """Listen on a free port (on loopback for a loopback host, else on every interface)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ipv6 = ":" in advertised_host
        bind = advertised_host if is_loopback_host(advertised_host) else ("::" if ipv6 else "0.0.0.0")
        site = web.TCPSite(self._runner, bind, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{f'[{advertised_host}]' if ipv6 else advertised_host}:{port}/v1"
        logger.info("model endpoint for env servers at {} (listening on {})", self.url, bind)
        return self.url

    async def stop(self) -> None:
        for key in list(self.logs):
            self._end(key)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def begin(self, key: str, task: RolloutTask, index: int) -> None:
        self.tokens.begin(key, task, index)
        self.logs[key] = CallLog()

    def finish(self, key: str) -> RolloutTokens:
        self._end(key)
        return self.tokens.finish(key)

    def _end(self, key: str) -> None:
        """Forget the rollout; calls still sampling for it (its episode timed out or died) are cancelled."""
        log = self.logs.pop(key, None)
        if log is not None:
            log.ended = True
            for sampling in log.sampling:
                sampling.cancel()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not secrets.compare_digest(request.headers.get(SECRET_HEADER, ""), self.secret):
            return _error(401, f"missing or wrong {SECRET_HEADER} header")
        try:
            body = checked_body(await request.json())
        except (ValueError, TypeError) as exc:  # ValueError: not JSON at all
            return _error(400, f"not a chat completions request: {exc}")
        key = body["model"]
        log = self.logs.get(key)
        if log is None:
            return _error(404, f"no rollout is running under the model name {key!r}")
        messages = [{k: m[k] for k in WIRE_FIELDS if k in m} for m in body["messages"]]
        tools = body.get("tools") or []
        previous, tail_start = continued_call(log, messages)
        sampling = asyncio.ensure_future(self.tokens.sample(key, messages, tools, previous, tail_start))
        log.sampling.add(sampling)
        try:
            completion, context = await sampling
        except asyncio.CancelledError:
            if log.ended:  # not this request cancelled, but its rollout
                return _error(404, f"the rollout {key!r} ended while this call was sampled")
            raise
        except (InferenceError, TemplateError) as exc:
            # 400: a full context or an unrenderable template will not get better on a retry.
            return _error(400, str(exc))
        finally:
            log.sampling.discard(sampling)
        content, calls, finish = assistant_reply(completion, bool(tools))
        reply = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        log.calls.append(Answered([message_key(m) for m in [*messages, reply]], context + completion.token_ids))
        usage = {"prompt_tokens": len(context), "completion_tokens": len(completion.token_ids),
                 "total_tokens": len(context) + len(completion.token_ids)}  # fmt: skip
        if body.get("stream"):
            return await _stream(request, key, reply, finish, usage)
        return web.json_response({
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": key,
            "choices": [{"index": 0, "message": reply, "finish_reason": finish}], "usage": usage,
        })  # fmt: skip


def checked_body(body: Any) -> dict[str, Any]:
    """``body`` when it has a string ``model`` and a list of messages with string roles; TypeError otherwise."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise TypeError("the body needs a string `model`")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TypeError("the body needs a non-empty list `messages`")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise TypeError("every message needs a string `role`")
    if not isinstance(body.get("tools") or [], list):
        raise TypeError("`tools` must be a list")
    return body


def message_key(message: dict[str, Any]) -> MessageKey:
    """What two renderings of the same message share, whichever SDK re-sent it."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = tuple(
        (str(call.get("function", {}).get("name")), str(call.get("function", {}).get("arguments")))
        for call in message.get("tool_calls") or [] if isinstance(call, dict)
    )  # fmt: skip
    return message["role"], str(content or ""), calls, str(message.get("tool_call_id") or "")


def continued_call(log: CallLog, messages: list[dict[str, Any]]) -> tuple[list[int] | None, int]:
    """The tokens of the answered call this request continues and where its new messages start;
    ``(None, 0)`` when it continues none (the longest match wins)."""
    keys = [message_key(m) for m in messages]
    best: Answered | None = None
    for call in log.calls:
        size = len(call.path)
        if size < len(keys) and keys[:size] == call.path and (best is None or size > len(best.path)):
            best = call
    return (None, 0) if best is None else (best.ids, len(best.path))


async def _stream(request: web.Request, key: str, reply: dict[str, Any], finish: str,
                  usage: dict[str, int]) -> web.StreamResponse:  # fmt: skip
    """The reply as chat.completion.chunk events: the message, the finish reason, the usage, [DONE]."""
    head = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": key}
    delta: dict[str, Any] = {"role": "assistant", "content": reply["content"]}
    if "tool_calls" in reply:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(reply["tool_calls"])]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        {**head, "choices": [], "usage": usage},
    ]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _error(status: int, message: str) -> web.Response:
    if status >= 500 or status in (401, 404):
        logger.warning("model endpoint answered {}: {}", status, message)
    kind = "invalid_request_error" if status == 400 else "not_found_error" if status == 404 else "authentication_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _completion_id() -> str:
    return f"rlbus-{time.monotonic_ns()}"
