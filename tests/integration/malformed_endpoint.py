"""A real HTTP server that looks like vLLM until it samples: ``/v1/models`` and ``/tokenize`` answer
as vLLM does, ``/v1/completions`` answers choices without token ids or logprobs (what a server
that ignores ``return_token_ids``, or a proxy that strips it, sends)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class MalformedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._answer(200, {"object": "list", "data": [{"id": "text-only", "object": "model"}]})
        else:
            self._answer(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self._answer(200, {"tokens": [1, 2, 3], "max_model_len": 1024})
        elif self.path == "/v1/completions":
            choices = [{"index": i, "text": "hi", "finish_reason": "stop"} for i in range(body.get("n", 1))]
            self._answer(200, {"choices": choices})
        else:
            self._answer(404, {"error": f"no route {self.path}"})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve_malformed_endpoint() -> Iterator[str]:
    """Run the server on a free port; yields its ``/v1`` base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), MalformedHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
