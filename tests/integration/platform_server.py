"""A local Prime platform: the RFT API as rlbus talks to it (docs/platform.md), recording every request.

:class:`PlatformServer` is a real HTTP server on a free loopback port. It answers registration
(``201 {"run": {"id": ...}}``), metrics, the samples flow (presign, a PUT to the presigned URL,
which points back here, confirm) and the status, checks the ``Authorization: Bearer`` key on every
API route (401 otherwise), and records each request: route, method, path, headers, JSON body, the
status it answered. Tests wait on the records (a condition variable, no sleeping) and script faults:
answer the next requests of a route with given statuses (:meth:`fail`), or go down mid-run
(:meth:`go_down`: the port then refuses connections).

It also runs as a program (``python platform_server.py --host 0.0.0.0 --port 8080 --public-url
http://platform:8080 --record requests.jsonl``; the key from ``PRIME_API_KEY``), e.g. as a compose
service beside the monitor: each request is appended to the record file as one JSON line, and
:meth:`Recorded.read` reads them back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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


class Recorded:
    """The requests a platform server saw: live (:class:`PlatformServer`), or read back from its record file."""

    def __init__(self, requests: Sequence[Request] = ()) -> None:
        self.requests: list[Request] = list(requests)
        self.cond = threading.Condition()

    @classmethod
    def read(cls, path: Path) -> Recorded:
        """The requests recorded in ``path`` (``--record``; an upload's body is its size in bytes there)."""
        return cls([Request(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()])

    def of(self, route: str, ok_only: bool = True) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.route == route and (r.status < 300 or not ok_only)]


class PlatformServer(Recorded):
    """Start with ``with PlatformServer() as server:``; ``server.base_url`` is the ``prime_platform.base_url``.
    ``public_url``: the base URL clients use (and presigned URLs point to), when not the bound address."""

    def __init__(self, api_key: str = "test-prime-key", forbid: bool = False, host: str = "127.0.0.1", port: int = 0,
                 public_url: str | None = None, record_to: Path | None = None) -> None:  # fmt: skip
        super().__init__()
        self.api_key, self.forbid = api_key, forbid
        self.public_url, self.record_to = public_url, record_to
        self.faults: dict[str, list[int]] = {}
        self.num_runs = 0
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="platform-server", daemon=True)
        self.up = False

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://127.0.0.1:{self.httpd.server_address[1]}"

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
        request = Request(route, method, path, headers, body, status)
        with self.cond:
            self.requests.append(request)
            if self.record_to is not None:
                self._record(request)
            self.cond.notify_all()
        return status, answer, route

    def _record(self, request: Request) -> None:
        """One JSON line per request, written at once (a reader may look while the server runs). The
        headers are left out: they hold the key; an upload's body is its size."""
        line = {**asdict(request), "headers": {}}
        if isinstance(request.body, bytes):
            line["body"] = len(request.body)
        with self.record_to.open("a") as out:  # type: ignore[union-attr]
            out.write(json.dumps(line) + "\n")

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


def first_steps(server: Recorded, run_id: str | None = None) -> list[int]:
    """The steps of the metrics rows (of run ``run_id``, or of every run) in the order they were first sent."""
    rows = [r.body for r in server.of("metrics") if run_id is None or r.body["run_id"] == run_id]
    return list(dict.fromkeys(row["metrics"]["step"] for row in rows))


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


def main(argv: Sequence[str]) -> None:
    """Serve on ``--host``/``--port`` until SIGTERM, recording every request to ``--record``."""
    parser = argparse.ArgumentParser(description="A local Prime platform (tests/integration/platform_server.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-url", help="the base URL clients use, e.g. http://platform:8080")
    parser.add_argument("--record", type=Path, required=True, help="append each request here as a JSON line")
    args = parser.parse_args(argv)
    key = os.environ.get("PRIME_API_KEY", "")
    if not key:
        parser.error("PRIME_API_KEY is not set: the key the server accepts")
    server = PlatformServer(key, host=args.host, port=args.port, public_url=args.public_url, record_to=args.record)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 of a container: no default SIGTERM action
    print(f"platform server on {args.host}:{args.port} ({server.base_url})", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
