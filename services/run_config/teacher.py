"""Checks of the teacher before anything starts: the one config check that asks the network.

Part of :mod:`rlbus.services.run_config.checks`, so ``rlbus rl`` (``--dry-run`` included) and an
orchestrator started alone (``rlbus orchestrator @ orchestrator.toml``) both refuse a teacher that
cannot do its job, with one line naming its URL, before any service starts. Start the teacher first.

- ``sft``: the teacher answers ``GET <base_url>/models`` (any OpenAI-compatible server does).
- ``opd``: one scoring request (``rlbus.teacher.scoring_body``) must come back with a prompt logprob
  for every token; and the teacher's tokenizer must be the student's, since the orchestrator
  subtracts logprobs of the same token ids: a few texts (special tokens included) must tokenize to
  the same ids and token strings on the teacher's ``/tokenize`` as with the student's
  ``tokenizer.json``, and the highest id of each vocabulary must decode the same on both sides.
  A student without a local ``tokenizer.json`` (a hub id) is not compared; a warning says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from loguru import logger

from rlbus.teacher import TeacherClientConfig, TeacherError, prompt_token_logprobs, scoring_body

PROBE_TIMEOUT_S = 30.0
PROBE_TEXTS = (
    "Hello, world! 12345",
    "  leading spaces\tand\ttabs\n\nnew lines ",
    "naïve café, 東京, emoji 🤖",
    'def reverse(text: str) -> str:\n    return text[::-1]  # "quotes"',
)
"""Texts both tokenizers must cut the same way (with the student's special tokens appended)."""


def teacher_problem(mode: str, client: TeacherClientConfig, student_model: str) -> str | None:
    """Why the teacher of ``mode`` cannot serve, in one sentence naming its URL; None when it can."""
    headers = {"Authorization": f"Bearer {client.api_key}"} if client.api_key else {}
    try:
        with httpx.Client(headers=headers, timeout=PROBE_TIMEOUT_S) as http:
            if mode == "sft":
                _get(http, f"{client.base_url}/models")
                return None
            _check_distillation_teacher(http, client, student_model)
    except TeacherError as exc:
        return str(exc)
    return None


def _check_distillation_teacher(http: httpx.Client, client: TeacherClientConfig, student_model: str) -> None:
    student = _student_tokenizer(student_model)
    tokenize_url = client.base_url.removesuffix("/v1") + "/tokenize"
    try:
        teacher_ids = _tokenize(http, client, PROBE_TEXTS[0])
    except TeacherError:
        teacher_ids = None  # not vLLM: the scoring request below says what is missing
    if teacher_ids is not None and student is not None:
        _same_tokenizer(http, client, student_model, student)
    probe = teacher_ids or (student.encode(PROBE_TEXTS[0], add_special_tokens=False).ids if student else [1, 2, 3])
    url = f"{client.base_url}/completions"
    prompt_token_logprobs(_post(http, url, scoring_body(client.model, probe)), probe, url)
    if teacher_ids is None:
        raise TeacherError(f"{tokenize_url} did not tokenize a text, so the teacher's tokenizer cannot be checked "
                           "against the student's: opd needs a vLLM server (`rlbus inference`, `vllm serve`)")  # fmt: skip
    if student is None:
        logger.warning("the student {} has no local tokenizer.json: not checked against the teacher's tokenizer "
                       "(opd needs both to be the same)", student_model)  # fmt: skip


def _same_tokenizer(http: httpx.Client, client: TeacherClientConfig, student_model: str, student: Any) -> None:
    specials = "".join(token.content for token in student.get_added_tokens_decoder().values() if token.special)
    for text in (*PROBE_TEXTS, specials[:2000]):
        theirs = _tokenize(http, client, text, with_strings=True)
        ours = student.encode(text, add_special_tokens=False)
        if theirs != (ours.ids, ours.tokens):
            first = next((i for i, pair in enumerate(zip(theirs[0], ours.ids)) if pair[0] != pair[1]),
                         min(len(theirs[0]), len(ours.ids)))  # fmt: skip
            raise _differs(client, student_model, f"{text[:40]!r} is tokenized as {theirs[0][first:first + 6]} "
                                                  f"by the teacher and {ours.ids[first:first + 6]} by the student "
                                                  f"(from token {first})")  # fmt: skip
    _same_vocabulary(http, client, student_model, student)


def _same_vocabulary(http: httpx.Client, client: TeacherClientConfig, student_model: str, student: Any) -> None:
    size = student.get_vocab_size(with_added_tokens=True)
    last = _detokenize(http, client, [size - 1])
    if last != student.decode([size - 1], skip_special_tokens=False):
        raise _differs(client, student_model, f"the student's last token id {size - 1} decodes to "
                                              f"{student.decode([size - 1], skip_special_tokens=False)!r}, "
                                              f"on the teacher to {last!r}")  # fmt: skip
    beyond = _detokenize(http, client, [size])
    if beyond:  # the teacher knows more tokens than the student's vocabulary of `size`
        raise _differs(client, student_model, f"the student's vocabulary has {size} tokens, the teacher decodes "
                                              f"id {size} too (to {beyond!r})")  # fmt: skip


def _differs(client: TeacherClientConfig, student_model: str, detail: str) -> TeacherError:
    return TeacherError(f"the teacher {client.model!r} at {client.base_url} does not use the tokenizer of the "
                        f"student {student_model!r}: {detail}; on-policy distillation compares the two models' "
                        "logprobs of the same token ids, so give the teacher the student's tokenizer")  # fmt: skip


def _student_tokenizer(model: str) -> Any:
    path = Path(model).expanduser() / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer  # installed with transformers; no torch
    except ImportError:
        return None
    return Tokenizer.from_file(str(path))


def _tokenize(http: httpx.Client, client: TeacherClientConfig, text: str,
              with_strings: bool = False) -> Any:  # fmt: skip
    """The teacher's ids of ``text`` (and token strings with ``with_strings``) from vLLM's ``/tokenize``."""
    url = client.base_url.removesuffix("/v1") + "/tokenize"
    body = {"model": client.model, "prompt": text, "add_special_tokens": False, "return_token_strs": with_strings}
    data = _post(http, url, body)
    ids, strings = data.get("tokens"), data.get("token_strs")
    if not isinstance(ids, list) or (with_strings and not isinstance(strings, list)):
        raise TeacherError(f"{url} answered without tokens: {json.dumps(data)[:200]}")
    return (ids, strings) if with_strings else ids


def _detokenize(http: httpx.Client, client: TeacherClientConfig, ids: list[int]) -> str | None:
    """The teacher's text of ``ids``; None when it refuses them (an id outside its vocabulary)."""
    url = client.base_url.removesuffix("/v1") + "/detokenize"
    response = _send(url, lambda: http.post(url, json={"model": client.model, "tokens": ids}))
    if 400 <= response.status_code < 600:
        return None
    data = _json(url, response)
    return data.get("prompt") if isinstance(data, dict) else None


def _get(http: httpx.Client, url: str) -> Any:
    return _json(url, _send(url, lambda: http.get(url)))


def _post(http: httpx.Client, url: str, body: dict[str, Any]) -> Any:
    return _json(url, _send(url, lambda: http.post(url, json=body)))


def _send(url: str, send: Callable[[], httpx.Response]) -> httpx.Response:
    try:
        return send()
    except httpx.HTTPError as exc:
        raise TeacherError(f"cannot reach the teacher at {url}: {type(exc).__name__}: {exc}; start it before "
                           "the run (docs/training.md)") from None  # fmt: skip


def _json(url: str, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise TeacherError(f"the teacher at {url} answered {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError:
        raise TeacherError(
            f"the teacher at {url} answered with a body that is not JSON: {response.text[:200]}"
        ) from None
