"""A real HTTP server standing in for vLLM: ``/tokenize`` renders chat templates with the tiny
model's tokenizer, ``/v1/completions`` answers with token ids and logprobs like vLLM does.

What the "policy" answers is a function of the conversation's last user text (and, for
:func:`alternating_answer`, of how many requests came before), so rewards are known exactly.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USER_TEXT = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


Answer = Callable[[str], str]


def even_length_answer(user_text: str) -> str:
    """Reverses texts of even length correctly (reward 1) and fails the others (reward 0)."""
    if len(user_text) % 2 == 0:
        return f"<reversed_text>{user_text[::-1]}</reversed_text>"
    return "no idea"


def alternating_answer() -> Answer:
    """Right on every other request, so the rollouts of one group mostly differ."""
    counter = itertools.count()
    lock = threading.Lock()

    def answer(user_text: str) -> str:
        with lock:
            right = next(counter) % 2 == 0
        return f"<reversed_text>{user_text[::-1]}</reversed_text>" if right else "no idea"

    return answer


class FakePolicy:
    """What the server answers, which policy step it claims, and a gate that holds completions."""

    def __init__(self, answer: Answer, policy_step: Callable[[], int] = lambda: 0) -> None:
        self.answer, self.policy_step = answer, policy_step
        self.gate = threading.Event()
        self.gate.set()
        self.num_held = 0
        self._changed = threading.Condition()

    def complete(self, user_text: str) -> tuple[str, int]:
        """The answer text and policy step; waits while the gate is closed (a request counts as held)."""
        with self._changed:
            self.num_held += 1
            self._changed.notify_all()
        self.gate.wait()
        return self.answer(user_text), self.policy_step()

    def wait_held(self, count: int, timeout_s: float) -> None:
        """Return once ``count`` completion requests have arrived (held while the gate is closed)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.num_held >= count, timeout_s):
                raise TimeoutError(f"{self.num_held} of {count} completion requests arrived within {timeout_s}s")


def make_handler(tokenizer: Any, policy: FakePolicy, max_model_len: int = 1024) -> type[BaseHTTPRequestHandler]:
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._answer(200, {"status": "ok"} if self.path == "/health" else {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                ids = tokenizer.apply_chat_template(
                    body["messages"], add_generation_prompt=body.get("add_generation_prompt", False),
                    continue_final_message=body.get("continue_final_message", False), tokenize=True,
                    return_dict=False,
                )  # fmt: skip
                self._answer(200, {"tokens": list(ids), "max_model_len": max_model_len})
            elif self.path == "/v1/completions":
                # ``n`` choices, each answered like a request of its own (vLLM samples them independently).
                user_text = USER_TEXT.findall(tokenizer.decode(body["prompt"]))[-1]
                self._answer(200, {"choices": [self._choice(index, user_text) for index in range(body.get("n", 1))]})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def _choice(self, index: int, user_text: str) -> dict:
            text, policy_step = policy.complete(user_text)
            ids = tokenizer.encode(text, add_special_tokens=False) + [end_of_turn]
            return {"index": index, "text": text, "token_ids": ids, "logprobs": {"token_logprobs": [-0.1] * len(ids)},
                    "finish_reason": "stop", "policy_step": policy_step}  # fmt: skip

        def _answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def serve_fake_vllm(policy: FakePolicy, max_model_len: int = 1024) -> Iterator[str]:
    """Run the server on a free port; yields its ``/v1`` base URL."""
    from rlbus.services.models.tokenizer import build_tokenizer

    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(build_tokenizer(), policy, max_model_len))
    server.daemon_threads = True  # a request held at the gate must not block shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        policy.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(30)
