"""Audit trails: written only when asked for, whole lines, a torn last line skipped on reading."""

from __future__ import annotations

import pytest

from rlbus.audit import ENV_VAR, AuditLog, read_audit


def test_no_audit_log_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert AuditLog.from_env("trainer-t0") is None


def test_records_are_appended_and_read_back_past_a_torn_line(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "audit"))
    log = AuditLog.from_env("env-worker-w0")
    assert log is not None and log.path == tmp_path / "audit" / "env-worker-w0.jsonl"
    log.write({"task_id": "a", "accepted": True})
    with log.path.open("a") as handle:
        handle.write('{"task_id": "b", "acc')  # a process killed mid-line
    assert read_audit(log.path) == [{"task_id": "a", "accepted": True}]


def test_a_name_that_is_a_path_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match=r"audit file name '../x' must be a plain file name"):
        AuditLog.from_env("../x")
