"""Ask the endpoint, once and before any file is written, whether ``rlbus synthesize`` can sample from it.

Two requests, neither retried: ``GET <base_url>/models`` (is anything listening, is
the key accepted, which model is served) and ``POST <root>/tokenize`` of a stand-in
chat (rollouts are token-in/token-out, as in training, so the server must render
chats into tokens: vLLM does, a chat-only hosted API does not). Every failure is a
:class:`UserError` naming the URL and what to do.
"""

from __future__ import annotations

from typing import Any

import httpx

from rlbus.errors import UserError
from rlbus.services.env_worker.inference import server_root

PREFLIGHT_TIMEOUT_S = 10.0


async def check_endpoint(http: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """The model name to sample (``model``, or the endpoint's only one); UserError when the endpoint
    cannot serve ``rlbus synthesize``."""
    served = await served_models(http, base_url)
    name = pick_model(base_url, served, model)
    await check_tokenize(http, base_url, name)
    return name


async def served_models(http: httpx.AsyncClient, base_url: str) -> list[str]:
    url = base_url.rstrip("/") + "/models"
    response = await _request(http, "GET", url)
    try:
        listed = response.json()["data"]
        return [str(entry["id"]) for entry in listed]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{url} answered {response.status_code} without a model list ({response.text[:200]!r}): "
                        "is --client.base-url an OpenAI-compatible API ending in /v1?") from None  # fmt: skip


def pick_model(base_url: str, served: list[str], model: str | None) -> str:
    """``model`` when it is served; the only served model when ``model`` is None."""
    if model is not None:
        if model not in served:
            raise UserError(f"model {model!r} is not served at {base_url} (it serves {served}): fix --model")
        return model
    if len(served) != 1:
        raise UserError(f"{base_url} serves {len(served)} models ({served}): pick one with --model")
    return served[0]


async def check_tokenize(http: httpx.AsyncClient, base_url: str, model: str) -> None:
    url = server_root(base_url) + "/tokenize"
    body = {"model": model, "messages": [{"role": "user", "content": "."}], "add_generation_prompt": True}
    response = await _request(http, "POST", url, body, refused_ok=True)
    if response.status_code in (404, 405):
        raise UserError(f"{url} answered {response.status_code}: rlbus synthesize samples token-in/token-out like "
                        "the env-worker and needs a vLLM server there (rlbus inference or vllm serve), not a "
                        "chat-only API")  # fmt: skip
    try:
        tokens = response.json()["tokens"]
    except (ValueError, KeyError, TypeError):
        tokens = None
    if response.status_code != 200 or not isinstance(tokens, list):
        raise UserError(f"{url} answered {response.status_code} without a token list: {response.text[:300]!r}")


async def _request(http: httpx.AsyncClient, method: str, url: str, body: dict[str, Any] | None = None,
                   refused_ok: bool = False) -> httpx.Response:  # fmt: skip
    """One request; UserError when nothing answers, the key is refused, or (unless ``refused_ok``) any 4xx/5xx."""
    try:
        response = await http.request(method, url, json=body, timeout=PREFLIGHT_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise UserError(f"cannot reach the endpoint {url} ({type(exc).__name__}: {exc or 'no answer'}): start a "
                        "server there (rlbus inference, vllm serve) or fix --client.base-url") from None  # fmt: skip
    if response.status_code in (401, 403):
        raise UserError(f"{url} refused the API key ({response.status_code}): pass the endpoint's key with "
                        "--client.api-key or name its environment variable with --client.api-key-var")  # fmt: skip
    if response.status_code >= 400 and not (refused_ok and response.status_code < 500):
        raise UserError(f"{url} answered {response.status_code}: {response.text[:300]!r}")
    return response
