"""A real HTTP server standing in for a teacher: vLLM's scoring answer (``prompt_logprobs``), chat
completions, ``/tokenize`` and ``/detokenize`` with the tiny model's tokenizer.

The teacher's logprob of token ``t`` is :func:`teacher_logprob` (whatever came before), so a test
knows every number it should get back. Switches make it the teachers the checks must refuse: one
without prompt logprobs (an OpenAI-compatible server that is not vLLM), one that fails.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "teacher"


def teacher_logprob(token_id: int) -> float:
    return -0.05 - (token_id % 7) / 10


@dataclass
class TeacherBehaviour:
    answer: Callable[[list[dict[str, Any]]], str] = lambda messages: "olleh"
    """The chat answer to a conversation."""
    prompt_logprobs: bool = True
    """False: completions come back without ``prompt_logprobs`` (not a vLLM server)."""
    status: int = 200
    """Any other value: every POST is answered with it."""
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def make_handler(tokenizer: Any, behaviour: TeacherBehaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._answer(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour.requests.append((self.path, body))
            if behaviour.status != 200:
                self._answer(behaviour.status, {"error": "the teacher is unwell"})
                return
            routes = {"/v1/completions": self._score, "/v1/chat/completions": self._chat,
                      "/tokenize": self._tokenize, "/detokenize": self._detokenize}  # fmt: skip
            route = routes.get(self.path)
            if route is None:
                self._answer(404, {"error": f"no route {self.path}"})
            else:
                self._answer(200, route(body))

        def _score(self, body: dict[str, Any]) -> dict[str, Any]:
            ids = body["prompt"]
            choice: dict[str, Any] = {"index": 0, "text": "x", "finish_reason": "length"}
            if behaviour.prompt_logprobs and body.get("prompt_logprobs") is not None:
                # The actual token, and (as vLLM does when it is not the top one) another id ranked first.
                choice["prompt_logprobs"] = [None] + [
                    {str(t): {"logprob": teacher_logprob(t), "rank": 2}, str(t + 1): {"logprob": -0.01, "rank": 1}}
                    for t in ids[1:]
                ]  # fmt: skip
            return {"choices": [choice]}

        def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
            text = behaviour.answer(body["messages"])
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}  # fmt: skip

        def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
            if "messages" in body:
                ids = tokenizer.apply_chat_template(
                    body["messages"], add_generation_prompt=body.get("add_generation_prompt", False),
                    continue_final_message=body.get("continue_final_message", False), tokenize=True,
                    return_dict=False,
                )  # fmt: skip
                return {"tokens": list(ids), "max_model_len": 1024}
            encoding = tokenizer.backend_tokenizer.encode(body["prompt"], add_special_tokens=False)
            return {"tokens": encoding.ids, "token_strs": encoding.tokens if body.get("return_token_strs") else None}

        def _detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
            ids = [t for t in body["tokens"] if t < len(tokenizer)]
            return {"prompt": tokenizer.decode(ids)}

        def _answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def serve_teacher(behaviour: TeacherBehaviour) -> Iterator[str]:
    """Run the server on a free port; yields its ``/v1`` base URL."""
    from rlbus.services.models.tokenizer import build_tokenizer

    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(build_tokenizer(), behaviour))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
