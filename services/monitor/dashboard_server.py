"""The dashboard's HTTP server: the page, its data as JSON, and a push channel (Server-Sent Events).

Python's own threaded HTTP server, so the monitor serves the page in every deployment without
another dependency: a page's stream is one thread, and a run has a few viewers. Routes:

- ``GET /``: the page (``web/index.html``); ``GET /static/<file>``: its script and style, and
  uPlot, the charting library, copied from npm into ``static/`` at build time
  (``scripts/build_dashboard.sh``): the page loads nothing from the internet.
- ``GET /api/state``: everything the page shows, as one JSON object
  (:meth:`rlbus.services.monitor.dashboard_state.Dashboard.state`).
- ``GET /api/stream``: the same object first, then, as ``data:`` events, what changed since,
  within one poll (:data:`POLL_S`) of a new line in the run's files.

A key (the monitor's ``view_api_key``), when given, is required on every request: as
``Authorization: Bearer <key>``, as ``?key=<key>`` (what a browser's address bar can carry;
the answer sets it as a cookie, so the page's own requests carry it too), or as that cookie.
Without it the answer is 401. Callers give a key whenever the server listens beyond loopback; a
server without one answers only requests addressed to a loopback name (403 otherwise).
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from loguru import logger

from rlbus.services.monitor.dashboard_state import Dashboard

PACKAGE_DIR = Path(__file__).resolve().parent
PAGE_DIR = PACKAGE_DIR / "web"
VENDOR_DIR = PACKAGE_DIR / "static"
STATIC_FILES = {
    "dashboard.js": (PAGE_DIR, "text/javascript"), "dashboard.css": (PAGE_DIR, "text/css"),
    "uPlot.iife.min.js": (VENDOR_DIR, "text/javascript"), "uPlot.min.css": (VENDOR_DIR, "text/css"),
}  # fmt: skip
"""Every file the server hands out, by name: nothing else on disk is reachable."""
COOKIE = "rlbus_dashboard_key"
POLL_S = 0.25
"""How often the run's files are checked for new lines."""
KEEPALIVE_S = 15.0
"""A stream with no news gets a comment this often, so proxies and browsers keep it open."""


def missing_static_files() -> list[Path]:
    """Files of the page not on disk: uPlot is copied in by ``scripts/build_dashboard.sh``."""
    return [folder / name for name, (folder, _) in STATIC_FILES.items() if not (folder / name).is_file()]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard
    api_key: str | None
    stopping: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # the name http.server dispatches to
        url = urlsplit(self.path)
        query_key = parse_qs(url.query).get("key", [None])[0]
        if not self._loopback_name():
            self._send(HTTPStatus.FORBIDDEN, b"this dashboard answers loopback names only (localhost, 127.0.0.1)\n",
                       "text/plain; charset=utf-8")  # fmt: skip
            return
        if not self._authorised(query_key):
            self._send(HTTPStatus.UNAUTHORIZED, b"dashboard key required: open the page as /?key=<monitor key>, "
                       b"or send 'Authorization: Bearer <key>'\n", "text/plain; charset=utf-8",
                       {"WWW-Authenticate": 'Bearer realm="rlbus dashboard"'})  # fmt: skip
            return
        # A key from the address bar becomes a cookie: the page's own requests then carry it.
        cookie = (
            {"Set-Cookie": f"{COOKIE}={quote(query_key, safe='')}; HttpOnly; SameSite=Strict; Path=/"}
            if query_key
            else {}
        )
        if url.path in ("/", "/index.html"):
            self._send_file(PAGE_DIR / "index.html", "text/html; charset=utf-8", cookie)
        elif url.path.startswith("/static/") and (name := url.path.removeprefix("/static/")) in STATIC_FILES:
            folder, kind = STATIC_FILES[name]
            self._send_file(folder / name, f"{kind}; charset=utf-8", cookie)
        elif url.path == "/api/state":
            payload, _ = self.server.dashboard.state()
            self._send(HTTPStatus.OK, json.dumps(payload, allow_nan=False).encode(), "application/json", cookie)
        elif url.path == "/api/stream":
            self._stream()
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _loopback_name(self) -> bool:
        """A server without a key (on loopback) answers only requests addressed to a loopback name: a web
        page elsewhere that points its own host name at 127.0.0.1 (DNS rebinding) cannot read the run."""
        if self.server.api_key is not None:
            return True
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        return host in ("localhost", "::1") or host.startswith("127.")

    def _authorised(self, query_key: str | None) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        header = self.headers.get("Authorization", "")
        cookies = SimpleCookie(self.headers.get("Cookie", ""))
        offered = [query_key, header.removeprefix("Bearer ") if header.startswith("Bearer ") else None,
                   unquote(cookies[COOKIE].value) if COOKIE in cookies else None]  # fmt: skip
        return any(value is not None and hmac.compare_digest(value.encode(), key.encode()) for value in offered)

    def _send_file(self, path: Path, kind: str, headers: dict[str, str]) -> None:
        try:
            body = path.read_bytes()
        except OSError:
            self._send(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{path.name} is missing from {path.parent}: build the "
                "dashboard with scripts/build_dashboard.sh (npm ci)\n".encode(),
                "text/plain; charset=utf-8",
            )
            return
        self._send(HTTPStatus.OK, body, kind, headers)

    def _send(self, status: HTTPStatus, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        """Everything first, then each change, until the page leaves or the server stops."""
        dashboard, stopping = self.server.dashboard, self.server.stopping
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cursor, seen = None, -1
        try:
            while not stopping.is_set():
                version = dashboard.wait_for_change(seen, KEEPALIVE_S) if cursor is not None else dashboard.version
                if version == seen:
                    self.wfile.write(b": keepalive\n\n")
                else:
                    payload, cursor = dashboard.state(cursor)
                    seen = payload["version"]
                    self.wfile.write(b"data: " + json.dumps(payload, allow_nan=False).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page was closed

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature
        logger.debug("dashboard: {} {}", self.address_string(), format % args)


class DashboardServer:
    """Serves a :class:`Dashboard` on ``host:port`` and keeps its runs read, until :meth:`stop`."""

    def __init__(self, dashboard: Dashboard, host: str, port: int, api_key: str | None = None) -> None:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        self.server = server_class((host, port), _Handler)  # binds now: a port in use fails here
        self.server.dashboard, self.server.api_key, self.server.stopping = dashboard, api_key, threading.Event()
        self.dashboard = dashboard
        self.threads = [threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True),
                        threading.Thread(target=self._follow, name="dashboard-files", daemon=True)]  # fmt: skip

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self.dashboard.poll()
        for thread in self.threads:
            thread.start()
        return self

    def _follow(self) -> None:
        while not self.server.stopping.wait(POLL_S):
            try:
                self.dashboard.poll()
            except Exception as exc:  # noqa: BLE001 - a bad file must not end the page (nor the monitor)
                logger.warning("dashboard: reading the run's files failed: {}: {}", type(exc).__name__, exc)

    def stop(self) -> None:
        self.server.stopping.set()
        self.dashboard.close()
        self.server.shutdown()
        self.server.server_close()
        for thread in self.threads:
            thread.join(timeout=5)
