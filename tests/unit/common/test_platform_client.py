"""The Prime platform client against a real local HTTP server that implements the contract."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from rlbus.platform_client import PlatformClient, PlatformHTTPError, mark_end, register_run, retrying
from tests.integration.platform_server import PlatformServer

KEY = "sk-test-platform-key"


@pytest.fixture
def server() -> Iterator[PlatformServer]:
    with PlatformServer(api_key=KEY) as running:
        yield running


@pytest.fixture
def client(server: PlatformServer) -> Iterator[PlatformClient]:
    made = PlatformClient(server.base_url, KEY, timeout_s=5.0)
    yield made
    made.close()


def test_register_sends_the_payload_with_the_bearer_key_and_returns_the_run_id(server, client, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    values = {"model": "m", "max_steps": 2, "orchestrator": {"train": {"env": [{"id": "reverse-text"}]}}}
    run_id = register_run(client, values, "name-1", None, {"PRIME_TEAM_ID": "team-9"})
    assert run_id == "run-1"
    (request,) = server.of("register")
    assert request.path == "/api/v1/rft/external-runs"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.body["name"] == "name-1" and request.body["team_id"] == "team-9"
    assert request.body["environments"] == [{"id": "reverse-text"}]


def test_a_wrong_key_gets_401_naming_the_scope_and_never_showing_the_key(server):
    wrong = PlatformClient(server.base_url, "sk-wrong-key")
    with pytest.raises(PlatformHTTPError) as error:
        wrong.register({"base_model": "m", "max_steps": 1})
    assert error.value.status == 401 and not error.value.transient
    assert "refused the API key (HTTP 401)" in str(error.value) and "rft:write" in str(error.value)
    assert "sk-wrong-key" not in str(error.value)


def test_403_says_the_key_lacks_the_scope():
    with PlatformServer(api_key=KEY, forbid=True) as forbidding:
        client = PlatformClient(forbidding.base_url, KEY)
        with pytest.raises(
            PlatformHTTPError, match=r"forbids POST /metrics \(HTTP 403\): the API key needs the rft:write"
        ):
            client.post_metrics("run-1", {"step": 1})


def test_5xx_is_transient_and_retried_with_backoff_until_it_succeeds(server, client):
    server.fail("metrics", 500, 502)
    retries = []
    retrying(30.0, on_retry=retries.append)(client.post_metrics, "run-1", {"step": 1, "loss": 0.5})
    assert [r.status for r in server.of("metrics", ok_only=False)] == [500, 502, 200]
    assert len(retries) == 2


def test_registration_is_not_replayed_after_a_5xx_but_is_after_a_429(server, client):
    server.fail("register", 500)
    with pytest.raises(PlatformHTTPError, match="answered HTTP 500 to POST /external-runs"):
        retrying(30.0, replayable_only=True)(client.register, {"base_model": "m", "max_steps": 1})
    assert len(server.of("register", ok_only=False)) == 1  # a second POST could register a second run
    server.fail("register", 429)
    assert retrying(30.0, replayable_only=True)(client.register, {"base_model": "m", "max_steps": 1}) == "run-1"


def test_an_answer_without_a_run_id_is_refused(server, client):
    server.fail("register", 200)  # 200 with {"detail": ...}: not the contract
    with pytest.raises(PlatformHTTPError, match="answered no usable run.id"):
        client.register({"base_model": "m", "max_steps": 1})


def test_samples_go_through_presign_a_bare_put_and_confirm(server, client):
    import pyarrow as pa

    table = pa.table({"step": [3]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    client.upload_samples("run-1", 3, buffer.getvalue())
    presign, upload, confirm = (server.of(route)[0] for route in ("presign", "upload", "confirm"))
    assert presign.body == {"run_id": "run-1", "step": 3}
    assert "authorization" not in upload.headers and upload.headers["content-type"] == "application/parquet"
    assert pq.read_table(io.BytesIO(upload.body)).to_pylist() == [{"step": 3}]
    assert confirm.body == {"run_id": "run-1", "step": 3, "s3_key": "samples-run-1-3.parquet"}


def test_status_is_a_put_with_the_reason_and_409_means_closed_already(server, client):
    assert mark_end(client, "run-1", "failed", "trainer was killed by SIGKILL")
    (status,) = server.of("status")
    assert status.method == "PUT" and status.path == "/api/v1/rft/external-runs/run-1/status"
    assert status.body == {"status": "failed", "error_message": "trainer was killed by SIGKILL"}
    server.fail("status", 409)
    assert client.set_status("run-1", "completed") is False


def test_a_platform_that_does_not_answer_times_out_as_transient():
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = PlatformClient(f"http://127.0.0.1:{silent.getsockname()[1]}", KEY, timeout_s=0.3)
        with pytest.raises(PlatformHTTPError, match=r"did not answer POST /metrics within 0.3s") as error:
            client.post_metrics("run-1", {"step": 1})
        assert error.value.transient and not error.value.replayable


def test_a_platform_that_is_down_is_transient_and_replayable(server, client):
    server.go_down()
    with pytest.raises(PlatformHTTPError, match="cannot reach the Prime platform") as error:
        client.post_metrics("run-1", {"step": 1})
    assert error.value.transient and error.value.replayable


def test_non_finite_values_never_reach_the_wire(server, client):
    with pytest.raises(ValueError, match="not JSON compliant"):
        client.post_metrics("run-1", {"loss": float("nan")})
    assert server.requests == []
