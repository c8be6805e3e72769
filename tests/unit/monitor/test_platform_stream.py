"""The monitor's stream to the Prime platform: a bounded queue and a sender thread, against a real server."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from rlbus.messages import Sample
from rlbus.platform_client import PlatformClient
from rlbus.services.monitor.platform_stream import SAMPLES_EVERY_STEPS, PlatformStream
from tests.integration.platform_server import PlatformServer

KEY = "sk-stream-key"


@pytest.fixture
def server() -> Iterator[PlatformServer]:
    with PlatformServer(api_key=KEY) as running:
        yield running


def stream_to(server: PlatformServer, key: str = KEY, **kwargs) -> PlatformStream:
    return PlatformStream(PlatformClient(server.base_url, key, timeout_s=5.0), "run-1", **kwargs)


def sample(text: str, reward: float = 0.5) -> Sample:
    return Sample(env_id="reverse-text", prompt=f"reverse {text}", completion=text[::-1], reward=reward, advantage=0.1,
                  answer=text[::-1], finish_reason="stop", num_prompt_tokens=7, num_completion_tokens=3)  # fmt: skip


def test_every_step_is_sent_in_order_with_its_step_and_a_timestamp(server):
    stream = stream_to(server)
    for step in range(1, 6):
        stream.log_step(step, {"loss/mean": 1.0 / step, "reward/all/mean": 0.1 * step})
    stream.close()
    sent = [r.body for r in server.of("metrics")]
    assert [body["metrics"]["step"] for body in sent] == [1, 2, 3, 4, 5]
    assert all(body["run_id"] == "run-1" and body["metrics"]["_timestamp"] > 0 for body in sent)
    assert sent[1]["metrics"]["loss/mean"] == 0.5
    assert stream.counts["metrics_sent"] == 5 and not any(k.startswith("dropped") for k in stream.counts)


def test_non_finite_metrics_are_dropped_by_name_and_the_rest_is_sent(server):
    stream = stream_to(server)
    stream.log_step(1, {"loss/mean": float("nan"), "grad_norm": float("inf"), "reward/all/mean": 0.5})
    stream.log_step(2, {"loss/mean": float("nan")})  # nothing finite left: nothing to send
    stream.close()
    (sent,) = server.of("metrics")
    assert set(sent.body["metrics"]) == {"reward/all/mean", "step", "_timestamp"}
    assert stream.non_finite == {"loss/mean", "grad_norm"} and stream.counts["non_finite"] == 3


def test_a_late_report_of_a_sent_step_resends_the_whole_row(server):
    stream = stream_to(server)
    stream.log_step(1, {"loss/mean": 0.5})
    server.wait_for(lambda s: len(s.of("metrics")) == 1, "step 1's row")
    stream.log_step(1, {"inference/requests": 4.0})  # inference reports step 1 later
    stream.close()
    rows = [r.body["metrics"] for r in server.of("metrics")]
    assert [row["step"] for row in rows] == [1, 1]
    assert rows[1]["loss/mean"] == 0.5 and rows[1]["inference/requests"] == 4.0


def test_a_500_then_success_is_retried_and_nothing_is_lost(server):
    server.fail("metrics", 500, 503)
    stream = stream_to(server)
    for step in (1, 2):
        stream.log_step(step, {"loss/mean": 0.5})
    stream.close()
    assert [r.status for r in server.of("metrics", ok_only=False)] == [500, 503, 200, 200]
    assert [r.body["metrics"]["step"] for r in server.of("metrics")] == [1, 2]
    assert stream.counts["retries"] == 2 and stream.counts["metrics_sent"] == 2


def test_a_platform_that_is_down_never_slows_the_caller_and_drops_are_counted(server):
    server.go_down()
    stream = stream_to(server, drain_s=1.0, queue_size=5)
    started = time.monotonic()
    for step in range(1, 21):
        stream.log_step(step, {"loss/mean": 0.5})
    assert time.monotonic() - started < 0.5  # twenty rows queued or dropped, none waited for
    stream.close()
    counts = stream.counts
    assert counts["dropped_queue_full_metrics"] >= 14  # one in flight, five waiting, the rest refused at once
    dropped = sum(n for key, n in counts.items() if key.startswith("dropped_"))
    assert dropped == 20 and counts["metrics_sent"] == 0 and counts["retries"] >= 1


def test_a_refused_key_stops_the_stream_after_one_request(server):
    stream = stream_to(server, key="sk-wrong")
    for step in (1, 2, 3):
        stream.log_step(step, {"loss/mean": 0.5})
    stream.close()
    assert len(server.of("metrics", ok_only=False)) == 1
    assert stream.refused is not None and "rft:write" in stream.refused and "sk-wrong" not in stream.refused
    assert stream.counts["dropped_refused_metrics"] == 3


def test_samples_go_as_parquet_at_most_once_per_interval(server):
    stream = stream_to(server)
    assert stream.log_samples(1, [sample("abc"), sample("hello", reward=1.0)])
    assert not stream.log_samples(2, [sample("later")])  # within the interval
    assert not stream.log_samples(3, [])
    assert stream.log_samples(1 + SAMPLES_EVERY_STEPS, [sample("xyz")])
    stream.close()
    assert [r.body["step"] for r in server.of("confirm")] == [1, 1 + SAMPLES_EVERY_STEPS]
    rows = pq.read_table(io.BytesIO(server.of("upload")[0].body)).to_pylist()
    assert [(row["step"], row["sample_id"], row["env_name"], row["reward"]) for row in rows] == [
        (1, 0, "reverse-text", 0.5), (1, 1, "reverse-text", 1.0),
    ]  # fmt: skip
    assert rows[0]["run_id"] == "run-1" and '"content": "cba"' in rows[0]["completion"]
    assert (rows[0]["num_input_tokens"], rows[0]["num_output_tokens"], rows[0]["advantage"]) == (7, 3, 0.1)


def test_close_gives_up_after_the_drain_limit(server):
    server.fail("metrics", *[500] * 50)
    stream = stream_to(server, drain_s=0.5)
    stream.log_step(1, {"loss/mean": 0.5})
    stream.log_step(2, {"loss/mean": 0.5})
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 4.0
    assert stream.counts["dropped_failed_metrics"] + stream.counts["dropped_at_close_metrics"] == 2


def test_close_never_waits_out_a_platform_that_hangs():
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = PlatformClient(f"http://127.0.0.1:{silent.getsockname()[1]}", KEY, timeout_s=30.0)
        stream = PlatformStream(client, "run-1", drain_s=0.3)
        stream.log_step(1, {"loss/mean": 0.5})
        stream.log_step(2, {"loss/mean": 0.5})
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 5.0  # not the 30 s the request may wait
    assert stream.counts["dropped_at_close_in_flight"] == 1 and stream.counts["dropped_at_close_metrics"] == 1
