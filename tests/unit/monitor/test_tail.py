"""``rlbus tail`` rendering and config, without a monitor (the live process is in test_service.py)."""

import io
import json

import pytest

from rlbus.config import ConfigError, write_toml
from rlbus.messages import ServiceHealth, ViewSnapshot
from rlbus.services.entry import load_tail_config, tail_main
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.tail import CLEAR_SCREEN, RED, TailView, render_screen, status_line
from rlbus.services.run_config import RlConfig


def snapshot(**overrides) -> ViewSnapshot:
    fields = dict(
        step=12, metrics={"loss/mean": 0.5, "reward/all/mean": 0.25, "zeta": 1.0},
        health=[
            ServiceHealth(service="trainer", replica_id="trainer-0", status="busy", alive=True, last_seen=98.0,
                          step=12, waiting_for="batch 13", waiting_since=90.0),
            ServiceHealth(service="env-worker", replica_id="env-worker-1", status="dead", alive=False, last_seen=40.0),
        ],
        log_lines=["12:00:00 INFO    step 12 | reward/all/mean 0.25"], log_offset=7, sent_at=100.0,
    )  # fmt: skip
    fields.update(overrides)
    return ViewSnapshot(**fields)


def test_status_line_puts_key_metrics_first_and_names_dead_replicas():
    assert status_line(snapshot()) == (
        "step 12 | reward/all/mean 0.25 | loss/mean 0.5 | 1/2 replicas alive | DEAD: env-worker/env-worker-1")
    assert status_line(snapshot(step=None, metrics={}, health=[])) == "step - | 0/0 replicas alive"


def test_screen_shows_metrics_health_with_waits_and_recent_lines():
    screen = render_screen(snapshot(), "tcp://m:5556", ["line a", "line b"])
    assert "rlbus tail  monitor tcp://m:5556" in screen
    assert "reward/all/mean" in screen and "zeta" in screen
    assert screen.index("reward/all/mean") < screen.index("zeta")
    trainer = next(line for line in screen.splitlines() if "trainer-0" in line)
    assert "busy" in trainer and "2s" in trainer and "batch 13 (10s)" in trainer
    dead = next(line for line in screen.splitlines() if line.startswith(RED))
    assert "env-worker-1" in dead and "DEAD" in dead and "60s" in dead
    assert screen.rstrip().endswith("line a\nline b")


def test_terminal_view_redraws_in_place_and_keeps_recent_lines():
    out = io.StringIO()
    view = TailView(out, json_lines=False, is_tty=True, num_log_lines=2)
    view.show(snapshot(log_lines=["a", "b"]), "addr")
    view.show(snapshot(log_lines=["c"]), "addr")
    frames = out.getvalue().split(CLEAR_SCREEN)
    assert len(frames) == 3 and frames[0] == ""
    assert frames[2].rstrip().endswith("b\nc")


def test_pipe_view_prints_new_lines_then_a_status_line_and_json_one_object_per_refresh():
    out = io.StringIO()
    TailView(out, json_lines=False, is_tty=False, num_log_lines=5).show(snapshot(log_lines=["x", "y"]), "addr")
    assert out.getvalue().splitlines() == ["x", "y", status_line(snapshot())]
    out = io.StringIO()
    view = TailView(out, json_lines=True, is_tty=False, num_log_lines=5)
    view.show(snapshot(), "addr")
    view.problem("no answer")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["step"] == 12 and first["health"][1]["status"] == "dead" and first["log_offset"] == 7
    assert second["error"] == "no answer"


def test_tail_reads_bus_and_key_from_an_rl_or_monitor_file_and_flags_win(tmp_path):
    rl = RlConfig(monitor=MonitorConfig(view_api_key="from-rl"))
    rl.bus.endpoints.monitor_view = "tcp://10.0.0.5:7000"
    rl_file = write_toml(rl, tmp_path / "rl.toml", reveal_secrets=True)  # a user's file: keys as written
    config = load_tail_config(["@", str(rl_file), "--json-lines", "--once"], {})
    assert (config.bus.endpoints.monitor_view, config.api_key, config.json_lines, config.once) == (
        "tcp://10.0.0.5:7000", "from-rl", True, True)
    monitor_file = write_toml(MonitorConfig(view_api_key="from-monitor"), tmp_path / "monitor.toml", reveal_secrets=True)
    config = load_tail_config(["@", str(monitor_file), "--api-key", "from-flag"], {})
    assert config.api_key == "from-flag" and config.bus.endpoints.monitor_view == "tcp://127.0.0.1:5556"


def test_a_resolved_rl_file_holds_the_key_redacted_and_tail_takes_it_from_the_environment(tmp_path):
    rl_file = write_toml(RlConfig(monitor=MonitorConfig(view_api_key="k")), tmp_path / "rl.toml")
    assert load_tail_config(["@", str(rl_file)], {"RLBUS_MONITOR__VIEW_API_KEY": "k"}).api_key == "k"
    assert load_tail_config(["@", str(rl_file)], {}).api_key is None  # the monitor then refuses: no key


def test_tail_takes_the_view_key_and_bus_from_the_environment():
    env = {"RLBUS_MONITOR__VIEW_API_KEY": "k", "RLBUS_BUS__ENDPOINTS__MONITOR_VIEW": "tcp://h:1"}
    config = load_tail_config([], env)
    assert (config.api_key, config.bus.endpoints.monitor_view) == ("k", "tcp://h:1")


def test_tail_config_mistakes_exit_2_naming_them(capsys):
    assert tail_main(["--interval-s", "0"]) == 2
    assert "interval_s: Input should be greater than 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key 'jsn'"):
        load_tail_config(["--jsn"], {})


def test_tail_help_lists_json_and_no_dry_run(capsys):
    assert tail_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: rlbus tail" in text and "--json-lines" in text and "--once" in text and "dry-run" not in text
