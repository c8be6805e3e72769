"""``rlbus inference`` with real vLLM on the tiny model, talked to with the official openai client.

One replica serves the whole module (vLLM takes a minute to start on a CPU).
Tests that change weights publish a new, higher step and compare with what they
published, so the order they run in does not matter.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load_file

from rlbus.messages import MetricsReport
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.inference_replica import API_KEY, Replica, seeded_weights, write_lora

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT_IDS = list(b"The quick brown fox")  # the tiny tokenizer is byte-level: ids are bytes
NUM_TOKENS = 12
LATE_STEP = 1  # published before the replica starts
# Steps published by later tests, always increasing (the trainer's store keeps the highest step).
NEXT_STEPS = itertools.count(LATE_STEP + 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


@pytest.fixture(scope="module")
def replica(model_dir: Path, tmp_path_factory) -> Iterator[Replica]:
    replica = Replica(model_dir, tmp_path_factory.mktemp("replica"))
    try:
        replica.trainer.publish(LATE_STEP, seeded_weights(model_dir, seed=LATE_STEP)[0])
        replica.start()
        # What the replica served first, before any test changed its weights.
        replica.first_health = health(replica)
        replica.first_greedy = greedy(openai_client(replica), str(model_dir))
        yield replica
    finally:
        replica.stop()


def openai_client(replica: Replica) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{replica.base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def client(replica: Replica) -> openai.OpenAI:
    return openai_client(replica)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(hf_model, state: dict, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens transformers produces with ``state`` loaded (no stop tokens)."""
    hf_model.load_state_dict({name: torch.from_numpy(array) for name, array in state.items()}, strict=False)
    hf_model.tie_weights()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(num_tokens):
            next_id = hf_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def greedy(client: openai.OpenAI, model: str, prompt_ids: list[int] = PROMPT_IDS) -> tuple[list[int], int]:
    """(completion token ids, policy step) of a greedy completion of ``prompt_ids``."""
    completion = client.completions.create(model=model, prompt=prompt_ids, max_tokens=NUM_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    choice = completion.choices[0]
    return choice.model_extra["token_ids"], completion.model_extra["policy_step"]


def decodes_to(tokenizer, token_ids: list[int], text: str) -> bool:
    """The ids decode to ``text`` the way vLLM detokenises: special tokens skipped, and an
    incomplete UTF-8 sequence at the very end (a random model emits any bytes) held back."""
    decoded = tokenizer.decode(token_ids, skip_special_tokens=True)
    return decoded == text or (decoded.startswith(text) and set(decoded[len(text) :]) == {"\ufffd"})


def health(replica: Replica) -> dict:
    return httpx.get(f"{replica.base_url}/health", timeout=30).json()


def served_step(replica: Replica) -> int:
    return health(replica)["policy_step"]


def test_a_late_replica_serves_the_step_published_before_it_started(replica, hf_model, model_dir):
    body = replica.first_health
    assert (body["ready"], body["policy_step"], body["source"]) == (True, LATE_STEP, "trainer")
    tokens, step = replica.first_greedy
    assert step == LATE_STEP
    assert tokens == hf_greedy(hf_model, seeded_weights(model_dir, LATE_STEP)[1], PROMPT_IDS, NUM_TOKENS)


def descendants(pid: int) -> list[str]:
    """The command lines (vLLM titles its processes ``VLLM::...``) of every process below ``pid``."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for child in map(int, children):
        found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        found += descendants(child)
    return found


def test_the_model_worker_runs_inside_the_engine_core_process(replica):
    # inference.worker_in_engine_process (the default): two processes, no separate VLLM::Worker.
    titles = [title for title in descendants(replica.process.pid) if title.startswith("VLLM::")]
    assert titles == ["VLLM::EngineCore"], titles


def test_completions_return_token_ids_logprobs_and_policy_step(replica, client, tokenizer, model_dir):
    completion = client.completions.create(model=str(model_dir), prompt="Hello there", max_tokens=16, logprobs=1,
                                           temperature=1.0, seed=3, extra_body={"return_token_ids": True})  # fmt: skip
    choice = completion.choices[0]
    token_ids = choice.model_extra["token_ids"]
    assert choice.model_extra["prompt_token_ids"] == tokenizer.encode("Hello there")
    assert len(token_ids) == completion.usage.completion_tokens > 0
    assert len(choice.logprobs.token_logprobs) == len(token_ids)
    assert all(lp <= 0.0 for lp in choice.logprobs.token_logprobs)
    assert decodes_to(tokenizer, token_ids, choice.text)
    assert completion.model_extra["policy_step"] == served_step(replica)


def test_a_prompt_given_as_token_ids_is_used_as_is(client, tokenizer, model_dir):
    by_ids = client.completions.create(model=str(model_dir), prompt=PROMPT_IDS, max_tokens=4, temperature=0,
                                       extra_body={"return_token_ids": True})  # fmt: skip
    by_text = client.completions.create(model=str(model_dir), prompt=tokenizer.decode(PROMPT_IDS), max_tokens=4,
                                        temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
    assert by_ids.choices[0].model_extra["prompt_token_ids"] == PROMPT_IDS
    assert by_ids.choices[0].model_extra["token_ids"] == by_text.choices[0].model_extra["token_ids"]


def test_chat_returns_rendered_prompt_ids_completion_ids_and_logprobs(client, tokenizer, model_dir):
    messages = [{"role": "user", "content": "Reverse: abc"}]
    completion = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=10,
                                                logprobs=True, extra_body={"return_token_ids": True})  # fmt: skip
    choice = completion.choices[0]
    token_ids = choice.model_extra["token_ids"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert completion.model_extra["prompt_token_ids"] == tokenizer.encode(rendered)
    assert len(choice.logprobs.content) == len(token_ids) == completion.usage.completion_tokens
    assert decodes_to(tokenizer, token_ids, choice.message.content)
    assert isinstance(completion.model_extra["policy_step"], int)


def test_streamed_chat_carries_token_ids_and_the_policy_step_in_every_event(client, model_dir):
    stream = client.chat.completions.create(model=str(model_dir), messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True, extra_body={"return_token_ids": True,
                                                                                   "ignore_eos": True})  # fmt: skip
    chunks = list(stream)
    steps = {chunk.model_extra["policy_step"] for chunk in chunks}
    token_ids = [t for chunk in chunks for c in chunk.choices for t in (c.model_extra.get("token_ids") or [])]
    assert len(steps) == 1 and len(token_ids) == 6
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_step_announced_on_the_bus_changes_greedy_output_to_what_transformers_produces(replica, client, hf_model,
                                                                                         model_dir):  # fmt: skip
    before, _ = greedy(client, str(model_dir))
    step = next(NEXT_STEPS)
    published, state = seeded_weights(model_dir, seed=100 + step, dtype="bfloat16")
    replica.trainer.publish(step, published)
    loaded = replica.wait_policy(step)
    assert loaded.replica_id == "replica-test" and loaded.base_url == f"{replica.base_url}/v1"
    assert health(replica)["policy_step"] == step
    tokens, tagged = greedy(client, str(model_dir))
    assert tagged == step
    assert tokens == hf_greedy(hf_model, state, PROMPT_IDS, NUM_TOKENS)
    assert tokens != before
    metrics = replica.wait_telemetry(
        MetricsReport, lambda m: m.step == step and "inference/weight_update_mb_per_s" in m.metrics
    )
    assert metrics.metrics["inference/weight_update_mb_per_s"] > 0


def test_a_corrupt_transfer_is_refused_and_the_old_step_keeps_serving(replica, client, model_dir):
    old_step = served_step(replica)
    before, _ = greedy(client, str(model_dir))
    bad_step = next(NEXT_STEPS)
    replica.store.corrupt_steps.add(bad_step)
    replica.trainer.publish(bad_step, seeded_weights(model_dir, seed=999)[0])
    event = replica.wait_event("weights_refused")
    assert event.fields["step"] == bad_step and "checksum mismatch" in event.message
    body = health(replica)
    assert (body["ready"], body["policy_step"]) == (True, old_step) and "checksum mismatch" in body["last_error"]
    assert greedy(client, str(model_dir)) == (before, old_step)


def test_reload_route_restores_the_base_weights(replica, client, hf_model, model_dir):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{replica.base_url}/rlbus/reload_weights", headers=headers, timeout=120)
    assert response.status_code == 200 and response.json()["policy_step"] == 0
    replica.wait_policy(0)
    base = load_file(str(model_dir / "model.safetensors"))
    assert greedy(client, str(model_dir)) == (hf_greedy(hf_model, base, PROMPT_IDS, NUM_TOKENS), 0)


def test_a_lora_adapter_samples_exactly_like_the_merged_weights(replica, client, hf_model, model_dir):
    step = next(NEXT_STEPS)
    published, state = seeded_weights(model_dir, seed=200 + step)
    replica.trainer.publish(step, published)
    replica.wait_policy(step)
    deltas = write_lora(replica.lora_dir / "adapter", model_dir, seed=5)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{replica.base_url}/rlbus/load_lora", headers=headers, timeout=120,
                          json={"lora_name": "adapter", "lora_path": str(replica.lora_dir / "adapter")})  # fmt: skip
    assert response.status_code == 200, response.text
    merged = state | {name: state[name] + delta for name, delta in deltas.items()}
    tokens, tagged = greedy(client, "adapter")
    assert tagged == step, "the policy step is the base weights' step"
    assert tokens == hf_greedy(hf_model, merged, PROMPT_IDS, NUM_TOKENS)
    assert tokens != greedy(client, str(model_dir))[0]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"model": "m", "max_tokens": 5}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ("/v1/completions", {"prompt": [999_999], "max_tokens": 5}, "out of vocabulary"),
        ("/v1/completions", {"prompt": [-1], "max_tokens": 5}, "greater than or equal to 0"),
        ("/v1/completions", {"prompt": list(range(100)) * 6, "max_tokens": 5}, "context length"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "role"),
        ("/rlbus/load_lora", {"lora_name": "a", "lora_path": "/nowhere"}, "outside inference.lora_dir"),
        ("/rlbus/load_lora", {"lora_name": "a", "lora_path": "org/adapter"}, "absolute path"),
        ("/rlbus/load_lora", {"lora_name": "a"}, "lora_path"),
    ],
)
def test_bad_bodies_get_a_4xx_with_a_message(replica, model_dir, path, body, message):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": str(model_dir), **body} if path.startswith("/v1") else body
    response = httpx.post(f"{replica.base_url}{path}", json=body, headers=headers, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.json()["error"]["message"]


def test_malformed_json_gets_a_4xx_and_the_server_keeps_serving(replica, client, model_dir):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{replica.base_url}/v1/completions", content=b"{not json", headers=headers, timeout=60)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert health(replica)["ready"] and greedy(client, str(model_dir))[0]


def test_the_api_key_is_required_except_for_health(replica, model_dir):
    body = {"model": str(model_dir), "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{replica.base_url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.post(f"{replica.base_url}/v1/completions", json=body, headers=wrong, timeout=60).status_code == 401
    assert httpx.get(f"{replica.base_url}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{replica.base_url}/health", timeout=60).status_code == 200


def test_models_lists_the_served_model(client, model_dir):
    assert next(model.id for model in client.models.list()) == str(model_dir), "adapters are listed after it"
