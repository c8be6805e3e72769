"""Async HTTP client to one or several inference replicas (vLLM's OpenAI-compatible API).

One pooled ``httpx.AsyncClient`` serves every replica; a semaphore caps the
requests in flight. Each request goes to the healthy replica with the fewest
requests in flight. Connection errors, timeouts, 429 and 5xx answers are
retried with exponential backoff, on another replica when there is one; the
replica that failed is set aside until its backoff passes and its ``/health``
answers 200. Other 4xx answers (a prompt too long, a bad request) are not
retried: they raise :class:`InferenceRefused` with the server's text.

Sampling is token-in/token-out: prompts are token ids on ``/v1/completions``
with ``return_token_ids`` and ``logprobs=0`` (the sampled token's logprob).
Chat rendering uses the server's ``/tokenize``. The policy step that sampled a
completion comes from a ``policy_step`` body field or ``X-Policy-Step`` header;
a server that sends neither is taken to serve step 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger

from rlbus.environments import Message
from rlbus.messages import SamplingParams
from rlbus.services.env_worker.config import InferenceClientSettings
from rlbus.services.env_worker.tokens import TokenizedChat

HEALTH_TIMEOUT_S = 5.0


class InferenceError(RuntimeError):
    """A request failed; the text says which replica(s) and why."""


class InferenceRefused(InferenceError):
    """The server answered 4xx: the request itself is wrong and retrying will not help."""


class InferenceUnavailable(InferenceError):
    """Every attempt failed with a connection error, timeout or 5xx."""


@dataclass
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_step: int
    prompt_token_ids: list[int] | None = None
    """The prompt as the server saw it (for checking token continuity)."""


@dataclass
class Replica:
    """One inference server and what this worker knows of its health."""

    url: str
    """OpenAI API base, e.g. ``http://host:8000/v1``."""
    root: str
    """Server root, where ``/health`` and ``/tokenize`` live."""
    in_flight: int = 0
    failures: int = 0
    """Consecutive failed requests; 0 means healthy."""
    retry_at: float = 0.0
    """``time.monotonic()`` after which an unhealthy replica may be probed again."""
    policy_step: int = -1
    """Latest policy step seen in its answers."""
    probing: bool = False


@dataclass
class InferenceStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    refused: int = 0
    by_replica: dict[str, int] = field(default_factory=dict)


def server_root(base_url: str) -> str:
    """``http://host:8000`` from ``http://host:8000/v1`` (vLLM serves /tokenize at the root)."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1")


class InferenceClient:
    """Completions and chat tokenization against a set of replicas, with retries and backoff."""

    def __init__(
        self,
        urls: list[str],
        *,
        api_key: str | None = None,
        max_concurrent_requests: int = 64,
        request_timeout_s: float = 300.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        model: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one inference URL is needed")
        self.replicas = [Replica(url=url.rstrip("/"), root=server_root(url)) for url in urls]
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.model = model
        self.stats = InferenceStats()
        self._probes: set[asyncio.Future[bool]] = set()  # background health probes (kept referenced)
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(
            max_connections=max_concurrent_requests, max_keepalive_connections=max_concurrent_requests
        )
        timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s))
        self.http = httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)

    @classmethod
    def from_settings(cls, urls: list[str], settings: InferenceClientSettings, model: str | None = None
                      ) -> InferenceClient:  # fmt: skip
        """A client for ``urls`` configured by ``settings`` (an env-worker's config, or eval's ``[client]``)."""
        return cls(urls, api_key=settings.api_key, max_concurrent_requests=settings.max_concurrent_requests,
                   request_timeout_s=settings.request_timeout_s, max_retries=settings.max_retries,
                   backoff_s=settings.retry_backoff_s, max_backoff_s=settings.max_backoff_s, model=model)  # fmt: skip

    async def close(self) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------ requests

    async def complete(
        self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int, seed: int | None = None
    ) -> Completion:
        """Sample one completion of ``prompt_ids``."""
        return (await self.complete_n(prompt_ids, sampling, max_tokens, 1, seed))[0]

    async def complete_n(
        self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int, n: int, seed: int | None = None
    ) -> list[Completion]:
        """Sample ``n`` completions of ``prompt_ids`` in one request (a group's first turn: the server
        computes the shared prompt once and schedules the ``n`` samples together)."""
        body: dict[str, Any] = {
            "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "logprobs": 0, "return_token_ids": True, "n": n,
        }  # fmt: skip
        if sampling.stop:
            body["stop"] = sampling.stop
        if seed is not None:
            body["seed"] = seed
        if self.model:
            body["model"] = self.model
        response, replica = await self.post("/completions", body)
        completions = parse_completions(response, replica.url, n)
        replica.policy_step = max(replica.policy_step, *(c.policy_step for c in completions))
        return completions

    async def tokenize_chat(
        self, messages: list[Message], tools: list[dict[str, Any]], *, add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> TokenizedChat:  # fmt: skip
        """Token ids of ``messages`` rendered with the served model's chat template."""
        body: dict[str, Any] = {
            "messages": messages, "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
        }  # fmt: skip
        if tools:
            body["tools"] = tools
        if self.model:
            body["model"] = self.model
        response, replica = await self.post("/tokenize", body, at_root=True)
        data = _json(response, replica.root + "/tokenize")
        if not isinstance(data.get("tokens"), list):
            raise InferenceError(f"{replica.root}/tokenize answered without a token list: {response.text[:200]}")
        return TokenizedChat(ids=data["tokens"], max_model_len=data.get("max_model_len"))

    async def post(self, path: str, body: dict[str, Any], at_root: bool = False) -> tuple[httpx.Response, Replica]:
        """POST to a healthy replica, retrying connection errors, timeouts, 429 and 5xx with backoff."""
        async with self._slots:
            errors: list[str] = []
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.stats.retries += 1
                    await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
                replica = await self.pick_replica()
                url = (replica.root if at_root else replica.url) + path
                error = await self._attempt(replica, url, body)
                if isinstance(error, httpx.Response):
                    return error, replica
                errors.append(error)
            self.stats.failures += 1
            raise InferenceUnavailable(f"{path} failed {self.max_retries + 1} time(s): " + "; ".join(errors[-3:]))

    async def _attempt(self, replica: Replica, url: str, body: dict[str, Any]) -> httpx.Response | str:
        """The response of a successful attempt, or the reason it should be retried."""
        self.stats.requests += 1
        self.stats.by_replica[replica.url] = self.stats.by_replica.get(replica.url, 0) + 1
        replica.in_flight += 1
        try:
            response = await self.http.post(url, json=body)
        except httpx.TransportError as exc:  # connection refused/reset, timeouts
            return self._failed(replica, f"{url}: {type(exc).__name__}: {exc}")
        finally:
            replica.in_flight -= 1
        if response.status_code == 429 or response.status_code >= 500:
            return self._failed(replica, f"{url} answered {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            self.stats.refused += 1
            raise InferenceRefused(f"{url} answered {response.status_code}: {response.text[:500]}")
        replica.failures = 0
        return response

    def _failed(self, replica: Replica, reason: str) -> str:
        replica.failures += 1
        replica.retry_at = time.monotonic() + min(self.max_backoff_s, self.backoff_s * 2 ** (replica.failures - 1))
        if replica.failures == 1:
            logger.warning("inference replica {} set aside: {}", replica.url, reason)
        return reason

    # ------------------------------------------------------------ health

    async def pick_replica(self) -> Replica:
        """The healthy replica with the fewest requests in flight (newest policy first on ties).

        Unhealthy replicas whose backoff has passed are probed via ``/health``:
        in the background while others are healthy, before choosing when none is.
        When nothing answers, the replica that failed longest ago is tried anyway.
        """
        now = time.monotonic()
        due = [r for r in self.replicas if r.failures and now >= r.retry_at and not r.probing]
        for replica in due:
            replica.probing = True
        healthy = [r for r in self.replicas if not r.failures]
        if healthy:
            for replica in due:
                probe = asyncio.ensure_future(self.probe(replica))
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
        else:
            await asyncio.gather(*(self.probe(r) for r in due))
            healthy = [r for r in self.replicas if not r.failures]
        if not healthy:
            return min(self.replicas, key=lambda r: r.retry_at)
        return min(healthy, key=lambda r: (r.in_flight, -r.policy_step))

    async def probe(self, replica: Replica) -> bool:
        """GET ``/health``; a 200 makes the replica healthy again, anything else extends its backoff."""
        replica.probing = True  # callers may set it earlier, so that concurrent picks do not probe twice
        try:
            response = await self.http.get(replica.root + "/health", timeout=HEALTH_TIMEOUT_S)
            healthy = response.status_code == 200
        except httpx.TransportError:
            healthy = False
        finally:
            replica.probing = False
        if healthy:
            logger.info("inference replica {} is healthy again", replica.url)
            replica.failures = 0
        else:
            self._failed(replica, "/health did not answer 200")
        return healthy

    async def ready_urls(self) -> list[str]:
        """The replicas whose ``/health`` answers 200 now (all asked at once).

        rlbus inference answers 503 until its engine is up and its first weights are
        loaded; a plain vLLM server refuses connections until then.
        """

        async def ready(replica: Replica) -> bool:
            try:
                response = await self.http.get(replica.root + "/health", timeout=HEALTH_TIMEOUT_S)
            except httpx.TransportError:
                return False
            return response.status_code == 200

        answers = await asyncio.gather(*(ready(r) for r in self.replicas))
        return [r.url for r, ok in zip(self.replicas, answers, strict=True) if ok]

    @property
    def num_unhealthy(self) -> int:
        return sum(1 for r in self.replicas if r.failures)


def parse_completions(response: httpx.Response, url: str, n: int = 1) -> list[Completion]:
    """The ``n`` choices of a ``/v1/completions`` answer, in ``index`` order; InferenceError names what
    is missing or wrong."""
    data = _json(response, url)
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        raise InferenceError(f"{url}: asked for {n} choice(s), got "
                             f"{len(choices) if isinstance(choices, list) else 'no list'}: {response.text[:300]}")
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    return [_completion(data, choice, response, url) for choice in ordered]


def _completion(data: dict[str, Any], choice: Any, response: httpx.Response, url: str) -> Completion:
    try:
        token_ids = choice["token_ids"]
        logprobs = choice["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise InferenceError(
            f"{url}: completion without choices[i].token_ids and logprobs.token_logprobs "
            "(does the server support return_token_ids?): " + response.text[:300]
        ) from None
    if len(logprobs) != len(token_ids) or any(lp is None for lp in logprobs):
        raise InferenceError(f"{url}: {len(token_ids)} tokens but logprobs {logprobs[:5]}... ({len(logprobs)})")
    return Completion(
        token_ids=list(token_ids),
        logprobs=[float(lp) for lp in logprobs],
        text=choice.get("text") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        policy_step=policy_step_of(data, choice, response.headers),
        prompt_token_ids=choice.get("prompt_token_ids"),
    )


def policy_step_of(data: dict[str, Any], choice: dict[str, Any], headers: httpx.Headers) -> int:
    """The sampling policy step from the body (top level or choice) or ``X-Policy-Step``; 0 if absent."""
    for value in (choice.get("policy_step"), data.get("policy_step"), headers.get("x-policy-step")):
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                logger.warning("ignoring a policy step that is not an integer: {!r}", value)
    return 0


def _json(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise InferenceError(f"{url} answered {response.status_code} with a body that is not JSON: "
                             f"{response.text[:200]}") from None  # fmt: skip
    if not isinstance(data, dict):
        raise InferenceError(f"{url} answered with JSON that is not an object: {response.text[:200]}")
    return data
