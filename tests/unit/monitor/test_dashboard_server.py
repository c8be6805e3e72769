"""The dashboard's HTTP server on loopback: the key rule, the page's files, its JSON, its push channel."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from rlbus.services.monitor import dashboard as dashboard_cli
from rlbus.services.monitor.config import MonitorConfig, dashboard_address
from rlbus.services.monitor.dashboard_server import DashboardServer
from rlbus.services.monitor.dashboard_state import Dashboard
from tests.unit.monitor.test_dashboard_run import append, step_row

KEY = "s3cret key"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    append(tmp_path / "run" / "steps.jsonl", step_row(1, 1010.0, 0.25))
    return tmp_path / "run"


@pytest.fixture
def server(run: Path) -> Iterator[DashboardServer]:
    """A server that needs KEY, as on a non-loopback host (it listens on loopback: the rule is the caller's)."""
    served = DashboardServer(Dashboard.of_folders([(run, "run")]), "127.0.0.1", 0, api_key=KEY).start()
    yield served
    served.stop()


def get(server: DashboardServer, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    host, port = server.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    return connection.getresponse()


def test_every_request_without_the_key_is_refused(server):
    for path in ("/", "/api/state", "/api/stream", "/static/dashboard.js"):
        answer = get(server, path)
        assert answer.status == 401, path
        assert answer.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert get(server, "/", {"Authorization": "Bearer wrong"}).status == 401
    assert get(server, "/?key=wrong").status == 401


def test_the_key_as_header_query_or_cookie_opens_the_page(server):
    assert get(server, "/", {"Authorization": f"Bearer {KEY}"}).status == 200
    answer = get(server, "/?key=s3cret%20key")
    assert answer.status == 200 and b"rlbus dashboard" in answer.read()
    cookie = answer.getheader("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # What the browser sends back with the page's own requests.
    assert get(server, "/static/dashboard.js", {"Cookie": cookie.split(";")[0]}).status == 200


def test_only_the_page_files_are_served(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/static/../config.py", "/static/package.json", "/web/index.html", "/etc/passwd"):
        assert get(server, path, auth).status == 404, path


def test_state_holds_the_files_values_and_the_stream_pushes_a_new_step(server, run):
    auth = {"Authorization": f"Bearer {KEY}"}
    state = json.loads(get(server, "/api/state", auth).read())
    assert state["runs"][0]["series"]["orchestrator/reward/all/mean"] == [[1, 0.25]]
    stream = get(server, "/api/stream", auth)
    assert stream.getheader("Content-Type") == "text/event-stream"
    first = json.loads(read_event(stream))
    assert first["runs"][0]["reset"] and first["runs"][0]["overview"]["step"] == 1
    append(run / "steps.jsonl", step_row(2, 1020.0, 0.75))
    pushed = json.loads(read_event(stream))  # the server's poll finds the line; no reload, no new request
    assert pushed["runs"][0]["series"]["orchestrator/reward/all/mean"] == [[2, 0.75]]
    assert not pushed["runs"][0]["reset"] and "charts" not in pushed


def read_event(stream: http.client.HTTPResponse) -> str:
    """The next ``data:`` event's payload (keepalive comments skipped); the socket's timeout bounds the wait."""
    while True:
        line = stream.readline().decode()
        assert line, "the stream ended"
        if line.startswith("data: "):
            return line.removeprefix("data: ")


def test_dashboard_addresses_and_the_non_loopback_rule():
    assert dashboard_address("127.0.0.1:8750") == ("127.0.0.1", 8750)
    assert dashboard_address("[::1]:0") == ("::1", 0)
    assert dashboard_address("") is None
    for bad in ("8750", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError, match="is not host:port"):
            dashboard_address(bad)
    with pytest.raises(ValueError, match="needs monitor.view_api_key"):
        MonitorConfig(dashboard="0.0.0.0:8750")
    assert MonitorConfig(dashboard="0.0.0.0:8750", view_api_key="k").dashboard == "0.0.0.0:8750"
    assert MonitorConfig(dashboard="").dashboard == ""


def test_the_monitor_dashboard_needs_the_key_off_loopback_and_steps_aside_from_a_taken_port(tmp_path):
    config = MonitorConfig(output_dir=tmp_path / "run", dashboard="0.0.0.0:0", view_api_key=KEY)
    served = dashboard_cli.start_live_dashboard(config)
    assert served is not None
    try:
        assert get(served, "/api/state").status == 401
        assert json.loads(get(served, "/api/state", {"Authorization": f"Bearer {KEY}"}).read())["live"] is True
    finally:
        served.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        warnings: list[str] = []
        handler = logger.add(warnings.append, level="WARNING")
        try:
            busy = MonitorConfig(output_dir=tmp_path / "run", dashboard=f"127.0.0.1:{taken.getsockname()[1]}")
            assert dashboard_cli.start_live_dashboard(busy) is None
        finally:
            logger.remove(handler)
    assert any("dashboard not served" in line for line in warnings), warnings
    assert dashboard_cli.start_live_dashboard(MonitorConfig(output_dir=tmp_path / "run", dashboard="")) is None


def test_rlbus_dashboard_refuses_bad_folders_and_an_open_remote_host(tmp_path, run, capsys, monkeypatch):
    monkeypatch.delenv(dashboard_cli.KEY_VARIABLE, raising=False)
    assert dashboard_cli.main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert dashboard_cli.main([str(tmp_path)]) == 2
    assert "has no steps.jsonl or metrics.jsonl" in capsys.readouterr().err
    assert dashboard_cli.main([str(run), "--host", "0.0.0.0"]) == 2
    assert "without --api-key" in capsys.readouterr().err
    assert dashboard_cli.run_names([run, tmp_path / "other" / "run"]) == [
        (run, str(run)), (tmp_path / "other" / "run", str(tmp_path / "other" / "run"))]  # fmt: skip


def test_a_server_without_a_key_answers_loopback_names_only(run):
    served = DashboardServer(Dashboard.of_folders([(run, "run")]), "127.0.0.1", 0).start()
    try:
        assert get(served, "/api/state").status == 200  # Host: 127.0.0.1:<port>
        assert get(served, "/api/state", {"Host": f"localhost:{served.server.server_address[1]}"}).status == 200
        assert get(served, "/api/state", {"Host": "evil.example:80"}).status == 403
    finally:
        served.stop()
