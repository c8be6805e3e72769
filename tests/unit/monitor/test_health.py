"""The monitor's health table, driven with explicit times (no sockets, no clocks)."""

from rlbus.messages import Heartbeat
from rlbus.services.monitor.health import HealthTable


def beat(service="trainer", replica="trainer-0", sent_at=100.0, pid=11, started_at=1.0, **fields) -> Heartbeat:
    return Heartbeat(service=service, replica_id=replica, host="h", pid=pid, started_at=started_at,
                     sent_at=sent_at, **fields)  # fmt: skip


def test_a_silent_replica_is_dead_once_after_the_timeout_and_back_when_it_beats():
    table = HealthTable(dead_after_s=30, stalled_after_s=600)
    table.observe(beat(), now=100)
    table.observe(beat(service="orchestrator", replica="orch"), now=100)
    assert table.check(now=129.9) == []
    table.observe(beat(service="orchestrator", replica="orch", sent_at=125), now=125)
    notices = table.check(now=130)
    assert [(n.kind, n.service, n.level) for n in notices] == [("service_dead", "trainer", "warning")]
    assert "trainer/trainer-0 is DEAD: no heartbeat for 30s" in notices[0].message
    # Reported once: later checks name only the orchestrator, which fell silent after 125.
    assert [(n.kind, n.service) for n in table.check(now=200)] == [("service_dead", "orchestrator")]
    rows = {row.replica_id: row for row in table.rows()}
    assert (rows["trainer-0"].alive, rows["trainer-0"].status) == (False, "dead")
    back = table.observe(beat(sent_at=210), now=210)
    assert [n.kind for n in back] == ["service_back"] and "back after 110s" in back[0].message
    assert [(r.service, r.alive, r.status) for r in table.rows()] == [
        ("orchestrator", False, "dead"), ("trainer", True, "ready")]


def test_dead_notice_names_pid_status_and_what_it_waited_for():
    table = HealthTable(dead_after_s=5, stalled_after_s=600)
    table.observe(beat(status="waiting", step=7, waiting_for="batch 8", waiting_since=99.0), now=100)
    (notice,) = table.check(now=106)
    assert "pid 11 on h" in notice.message and "last status waiting, step 7, waiting for batch 8" in notice.message
    assert notice.fields["last_status"] == "waiting"


def test_a_replica_that_said_it_was_stopping_is_stopped_not_dead():
    table = HealthTable(dead_after_s=5, stalled_after_s=600)
    table.observe(beat(status="stopping"), now=100)
    (notice,) = table.check(now=106)
    assert (notice.kind, notice.level) == ("service_stopped", "info")
    assert table.rows()[0].status == "stopped"


def test_a_new_pid_under_the_same_replica_id_is_a_restart():
    table = HealthTable(dead_after_s=5, stalled_after_s=600)
    table.observe(beat(pid=11), now=100)
    notices = table.observe(beat(pid=12, started_at=150.0, sent_at=150), now=150)
    assert [n.kind for n in notices] == ["service_restarted"] and "pid 11 on h -> pid 12 on h" in notices[0].message
    assert table.rows()[0].pid == 12


def test_a_long_wait_warns_once_per_wait_measured_on_the_senders_clock():
    table = HealthTable(dead_after_s=1000, stalled_after_s=60)
    # The sender's clock is 500 s behind the monitor's: only sent_at - waiting_since counts.
    table.observe(beat(sent_at=-400.0, status="waiting", waiting_for="weights step 3", waiting_since=-450.0), now=100)
    assert table.check(now=109) == []
    (notice,) = table.check(now=110)
    assert notice.kind == "service_stalled" and "waiting for weights step 3 for 60s" in notice.message
    table.observe(beat(sent_at=-390.0, status="waiting", waiting_for="weights step 3", waiting_since=-450.0), now=111)
    assert table.check(now=200) == []
    table.observe(beat(sent_at=-300.0, status="waiting", waiting_for="batch 4", waiting_since=-300.0), now=201)
    assert table.check(now=260) == []
    assert [n.kind for n in table.check(now=261)] == ["service_stalled"]


def test_rows_are_sorted_and_carry_what_tail_shows():
    table = HealthTable(dead_after_s=30, stalled_after_s=60)
    table.observe(beat(service="trainer", step=3), now=100)
    table.observe(beat(service="env-worker", replica="env-worker-1", waiting_for="tasks", waiting_since=90.0), now=101)
    rows = table.rows()
    assert [r.service for r in rows] == ["env-worker", "trainer"]
    assert (rows[0].waiting_for, rows[0].waiting_since, rows[0].last_seen) == ("tasks", 90.0, 101)
    assert (rows[1].step, rows[1].host, rows[1].pid) == (3, "h", 11)


def test_a_step_reporter_heartbeating_without_advancing_is_stalled_loudly_until_it_moves():
    table = HealthTable(dead_after_s=30, stalled_after_s=600, progress_stalled_after_s=100,
                        progress_services=frozenset({"trainer"}))
    table.observe(beat(status="busy", step=3), now=100)
    table.observe(beat(service="inference", replica="inf", step=3), now=100)
    for now in range(110, 200, 10):  # alive, busy, and still at step 3
        table.observe(beat(status="busy", step=3, sent_at=now), now=now)
        table.observe(beat(service="inference", replica="inf", step=3, sent_at=now), now=now)
        assert table.check(now=now) == []
    (notice,) = table.check(now=200)
    assert (notice.kind, notice.level, notice.service) == ("service_stalled", "error", "trainer")
    assert "trainer/trainer-0 is STALLED" in notice.message and "step 3 has not advanced for 100s" in notice.message
    assert table.check(now=210) == []  # said once
    assert {r.service: r.status for r in table.rows()} == {"inference": "ready", "trainer": "stalled"}
    (moved,) = table.observe(beat(status="busy", step=4, sent_at=310), now=310)
    assert moved.kind == "service_progressing" and table.rows()[1].status == "busy"
