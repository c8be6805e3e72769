"""A local Prime platform: the RFT API as rlbus talks to it (docs/platform.md), recording every request.

:class:`PlatformServer` is a real HTTP server on a free loopback port. It answers registration
(``201 {"run": {"id": ...}}``), metrics, the samples flow (presign, a PUT to the presigned URL,
which points back here, confirm) and the status, checks the ``Authorization: Bearer`` key on every
API route (401 otherwise), and records each request: route, method, path, headers, JSON body, the
status it answered. Tests wait on the records (a condition variable, no sleeping) and script faults:
answer the next requests of a route with given statuses (:meth:`fail`), or go down mid-run
(:meth:`go_down`: the port then refuses connections).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

API = "/api/v1/rft"
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(rf"{API}/external-runs"), "register"),
    ("PUT", re.compile(rf"{API}/external-runs/(?P<run_id>[^/]+)/status"), "status"),
    ("POST", re.compile(rf"{API}/metrics"), "metrics"),
    ("POST", re.compile(rf"{API}/samples/presign"), "presign"),
    ("POST", re.compile(rf"{API}/samples/confirm"), "confirm"),
    ("PUT", re.compile(r"/upload/(?P<key>[\w.-]+)"), "upload"),
)
DEADLINE_S = 120.0


@dataclass
class Request:
    route: str
    method: str
    path: str
    headers: dict[str, str]
    """Lower-case names."""
    body: Any
    """The JSON body (None for none); for ``upload`` the bytes."""
    status: int
    """What the server answered."""


class PlatformServer:
    """Start with ``with PlatformServer() as server:``; ``server.base_url`` is the ``prime_platform.base_url``."""

    def __init__(self, api_key: str = "test-prime-key", forbid: bool = False) -> None:
        self.api_key, self.forbid = api_key, forbid
        self.requests: list[Request] = []
        self.cond = threading.Condition()
        self.faults: dict[str, list[int]] = {}
        self.num_runs = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="platform-server", daemon=True)
        self.up = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        self.up = True
        return self

    def __exit__(self, *_: object) -> None:
        self.go_down()

    def go_down(self) -> None:
        """Stop answering and close the port: from now on connections are refused."""
        if self.up:
            self.up = False
            self.httpd.shutdown()
            self.httpd.server_close()

    def fail(self, route: str, *statuses: int) -> None:
        """Answer the next ``len(statuses)`` requests of ``route`` with these statuses, then normally."""
        with self.cond:
            self.faults.setdefault(route, []).extend(statuses)

    def of(self, route: str, ok_only: bool = True) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.route == route and (r.status < 300 or not ok_only)]

    def wait_for(self, condition: Callable[[PlatformServer], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: condition(self), timeout_s):
                routes = [(r.route, r.status) for r in self.requests]
                raise AssertionError(f"the platform server never saw {what}; requests: {routes}")

    def answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, str]:
        """(status, JSON answer, route) for one request; records it."""
        route, match = next(((name, m) for verb, pattern, name in ROUTES
                             if verb == method and (m := pattern.fullmatch(path))), ("unknown", None))  # fmt: skip
        body: Any = raw if route == "upload" else (json.loads(raw) if raw else None)
        status, answer = self._decide(route, match, headers, body)
        with self.cond:
            self.requests.append(Request(route, method, path, headers, body, status))
            self.cond.notify_all()
        return status, answer, route

    def _decide(self, route: str, match: re.Match[str] | None, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if match is None:
            return 404, {"detail": "Not Found"}
        if route != "upload" and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"detail": "Invalid or missing API key"}
        if self.forbid and route != "upload":
            return 403, {"detail": "API key lacks the rft:write scope"}
        with self.cond:
            queued = self.faults.get(route)
            if queued:
                return queued.pop(0), {"detail": "scripted failure"}
        if route == "register":
            with self.cond:
                self.num_runs += 1
                run_id = f"run-{self.num_runs}"
            return 201, {"run": {"id": run_id, "name": body.get("name")}}
        if route == "presign":
            key = f"samples-{body['run_id']}-{body['step']}.parquet"
            return 200, {"data": {"presignedUrl": f"{self.base_url}/upload/{key}", "s3Key": key}}
        return 200, {}


def _handler_for(server: PlatformServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, answer, _ = server.answer(self.command, self.path, headers, raw)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:  # the records are the log
            pass

    return Handler
