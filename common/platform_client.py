"""HTTP client of the Prime platform's RFT API; the contract and its sources are in docs/platform.md.

Each method sends one request and raises :class:`PlatformHTTPError` saying what went wrong and
whether trying again can help (``transient``: a 5xx, a 429, a timeout, a lost connection). Retrying
is the caller's choice, through :func:`retrying` (tenacity, exponential backoff): the monitor's
stream retries uploads, the launcher retries the final status, and registration is retried only
when the request cannot have reached the platform (``replayable``: a refused connection, a 429),
as a POST replayed after a lost answer would register a second run. No message holds the key.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import tenacity
from loguru import logger

from rlbus.prime_platform import (
    KEY_VARIABLE,
    SCOPE,
    PlatformError,
    api_root,
    dashboard_url,
    registration_payload,
    resolve_team_id,
    run_name,
)  # fmt: skip

REGISTER_BUDGET_S = 30.0
"""How long registration is tried while the platform cannot be reached at all."""
STATUS_BUDGET_S = 15.0
"""How long the final status is tried (it is idempotent: every transient failure is retried)."""
MAX_WAIT_S = 8.0
"""Longest pause between two tries of one request."""
MAX_REASON_CHARS = 4096
"""Longest ``error_message`` sent with a failed status (prime-runs caps it there)."""
RUN_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


class PlatformHTTPError(PlatformError):
    """A request the platform refused, failed or did not answer."""

    def __init__(self, message: str, status: int | None = None, transient: bool = False,
                 replayable: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.transient = transient
        """Trying again later may succeed (5xx, 429, timeouts, lost connections)."""
        self.replayable = replayable
        """The platform cannot have acted on it (connection refused, 429): safe to send again even for a POST."""


class PlatformClient:
    """Calls of ``<base_url>/api/v1/rft`` with ``Authorization: Bearer <key>``."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self.root = api_root(base_url)
        self.timeout_s = timeout_s
        self._key = api_key
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "rlbus"}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        # Presigned upload URLs carry their own credentials and refuse the platform's auth header.
        self.uploads = httpx.Client(timeout=timeout)

    def register(self, payload: dict[str, Any]) -> str:
        """``POST /external-runs``: the new run's id (``run.id`` of the answer)."""
        answer = self._call("POST", "/external-runs", payload)
        run = answer.get("run")
        run_id = run.get("id") if isinstance(run, dict) else None
        if not isinstance(run_id, (str, int)) or not str(run_id) or not set(str(run_id)) <= RUN_ID_CHARS:
            raise PlatformHTTPError(f"the Prime platform registered the run but answered no usable run.id "
                                    f"(got {str(answer)[:200]!r}) at {self.root}/external-runs")  # fmt: skip
        return str(run_id)

    def post_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        """``POST /metrics``: one step's metrics (with ``step`` and ``_timestamp`` among them)."""
        self._call("POST", "/metrics", {"run_id": run_id, "metrics": metrics})

    def upload_samples(self, run_id: str, step: int, parquet: bytes) -> None:
        """Samples of ``step`` as one Parquet object: presign, PUT to storage, confirm."""
        answer = self._call("POST", "/samples/presign", {"run_id": run_id, "step": step})
        data = answer.get("data") if isinstance(answer.get("data"), dict) else answer
        url, key = data.get("presignedUrl") or data.get("presigned_url"), data.get("s3Key") or data.get("s3_key")
        if not isinstance(url, str) or not isinstance(key, str) or not url.startswith(("http://", "https://")):
            raise PlatformHTTPError(f"the Prime platform answered no presignedUrl/s3Key to {self.root}/samples/presign "
                                    f"(got keys {sorted(data)})")  # fmt: skip
        self._send("PUT", url, "the samples upload", self.uploads, content=parquet,
                   headers={"Content-Type": "application/parquet"})  # fmt: skip
        self._call("POST", "/samples/confirm", {"run_id": run_id, "step": step, "s3_key": key})

    def set_status(self, run_id: str, status: str, reason: str | None = None) -> bool:
        """``PUT /external-runs/<id>/status``; False when the run was closed already (409)."""
        body: dict[str, Any] = {"status": status}
        if reason:
            body["error_message"] = reason[:MAX_REASON_CHARS]
        try:
            self._call("PUT", f"/external-runs/{run_id}/status", body)
        except PlatformHTTPError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def close(self) -> None:
        self.http.close()
        self.uploads.close()

    def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        # Strict JSON: a NaN that slipped through fails here, by name, not as an opaque 400.
        content = json.dumps(body, allow_nan=False, separators=(",", ":"))
        response = self._send(method, self.root + path, f"{method} {path}", self.http, content=content,
                              headers={"Content-Type": "application/json"})  # fmt: skip
        if not response.content:
            return {}
        try:
            answer = response.json()
        except ValueError:
            raise PlatformHTTPError(f"the Prime platform answered {method} {path} with HTTP {response.status_code} "
                                    f"but not JSON: {self._said(response)}") from None  # fmt: skip
        return answer if isinstance(answer, dict) else {"data": answer}

    def _send(self, method: str, url: str, what: str, client: httpx.Client, **kwargs: Any) -> httpx.Response:
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise PlatformHTTPError(f"the Prime platform did not answer {what} within {self.timeout_s:g}s "
                                    f"({type(exc).__name__})", transient=True,
                                    replayable=isinstance(exc, httpx.ConnectTimeout)) from None  # fmt: skip
        except httpx.TransportError as exc:
            raise PlatformHTTPError(f"cannot reach the Prime platform for {what} at {self.root}: {type(exc).__name__}: "
                                    f"{exc}", transient=True, replayable=isinstance(exc, httpx.ConnectError)) from None  # fmt: skip
        if response.is_success:
            return response
        raise self._refusal(what, response)

    def _refusal(self, what: str, response: httpx.Response) -> PlatformHTTPError:
        status, said = response.status_code, self._said(response)
        if status == 401:
            message = (f"the Prime platform refused the API key (HTTP 401) for {what}: check {KEY_VARIABLE} or run "
                       f"`prime login`; the key needs the {SCOPE} scope. It said: {said}")  # fmt: skip
        elif status == 403:
            message = (f"the Prime platform forbids {what} (HTTP 403): the API key needs the {SCOPE} scope, and the "
                       f"team must be allowed external runs. It said: {said}")  # fmt: skip
        else:
            message = f"the Prime platform answered HTTP {status} to {what}: {said}"
        transient = status == 429 or status >= 500
        return PlatformHTTPError(message, status, transient=transient, replayable=status == 429)

    def _said(self, response: httpx.Response) -> str:
        text = " ".join(response.text.split())[:300] or "(empty body)"
        return text.replace(self._key, "***") if self._key else text


def retrying(budget_s: float, give_up: threading.Event | None = None, replayable_only: bool = False,
             on_retry: Callable[[tenacity.RetryCallState], None] | None = None) -> tenacity.Retrying:  # fmt: skip
    """Tries of one call: again after a transient :class:`PlatformHTTPError` (only a replayable one when
    ``replayable_only``), with exponential backoff, for ``budget_s`` seconds or until ``give_up`` is
    set (which also cuts the pause short); then the last error is raised."""
    stop = tenacity.stop_after_delay(budget_s)
    if give_up is not None:
        stop = stop | tenacity.stop_when_event_set(give_up)

    def worth_retrying(exc: BaseException) -> bool:
        return isinstance(exc, PlatformHTTPError) and exc.transient and (exc.replayable or not replayable_only)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(worth_retrying), stop=stop,
        wait=tenacity.wait_exponential(multiplier=0.5, max=MAX_WAIT_S),
        sleep=give_up.wait if give_up is not None else time.sleep, before_sleep=on_retry, reraise=True,
    )  # fmt: skip


def register_run(client: PlatformClient, values: Mapping[str, Any], configured_name: str | None,
                 configured_team: str | None, environ: Mapping[str, str]) -> str:  # fmt: skip
    """Register a run described by ``values`` (the merged config as JSON values) and log its dashboard URL."""
    team_id = resolve_team_id(configured_team, environ)
    payload = registration_payload(values, run_name(configured_name, values), team_id)
    run_id = retrying(REGISTER_BUDGET_S, replayable_only=True)(client.register, payload)
    logger.info("prime platform: registered run {}{}: {}", run_id, f" for team {team_id}" if team_id else "",
                dashboard_url(run_id, environ))  # fmt: skip
    return run_id


def mark_end(client: PlatformClient, run_id: str, status: str, reason: str | None = None) -> bool:
    """Mark run ``run_id`` ``completed`` or ``failed`` (with ``reason``); False, logged, when it cannot be."""
    try:
        changed = retrying(STATUS_BUDGET_S)(client.set_status, run_id, status, reason)
    except PlatformHTTPError as exc:
        logger.warning("prime platform: could not mark run {} {}: {}", run_id, status, exc)
        return False
    if changed:
        logger.info("prime platform: marked run {} {}{}", run_id, status, f" ({reason})" if reason else "")
    else:
        logger.info("prime platform: run {} was closed already; not marked {}", run_id, status)
    return True
