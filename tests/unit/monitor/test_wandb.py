"""W&B logging in offline mode, read back from the run's own ``.wandb`` file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from rlbus.messages import MetricsReport, RolloutSamples, Sample
from rlbus.services.monitor.config import MonitorConfig, WandbConfig
from rlbus.services.monitor.monitor import Monitor

wandb = pytest.importorskip("wandb", reason="the monitor extra (wandb) is not installed")
from wandb.proto import wandb_internal_pb2

BLOCK_BYTES, RECORD_HEADER_BYTES = 32768, 7


def wandb_records(path: Path):
    """Records of a ``.wandb`` file: a 7-byte file header, then LevelDB-log blocks of
    32 KiB holding chunks [crc32: 4][length: 2][type: 1] (1 full, 2 first, 3 middle, 4 last)."""
    data, pos, pending = path.read_bytes(), RECORD_HEADER_BYTES, b""
    while pos + RECORD_HEADER_BYTES <= len(data):
        if BLOCK_BYTES - pos % BLOCK_BYTES < RECORD_HEADER_BYTES:
            pos += BLOCK_BYTES - pos % BLOCK_BYTES  # block trailer too small for a header: padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER_BYTES])
        if pos + RECORD_HEADER_BYTES + length > len(data):
            break  # a chunk still being written (finished_records waits for the rest)
        pos += RECORD_HEADER_BYTES
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
        elif kind == 0:
            break


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run's file. ``run.finish()`` can return before wandb-core (a
    separate process) has flushed the file's tail, so wait for its last record, ``exit``."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{path} has no exit record after {timeout_s:g}s: {kinds}")
        time.sleep(0.05)  # polling a file another process writes; no event to wait on


def history_rows(run_dir: Path) -> list[dict]:
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def report(service: str, step: int, **metrics: float) -> MetricsReport:
    return MetricsReport(service=service, replica_id=f"{service}-0", step=step, sent_at=0.0, metrics=metrics)


def run_monitor_with_wandb(output_dir: Path, steps: range) -> Monitor:
    from rlbus.services.monitor.wandb_sink import WandbSink

    config = MonitorConfig(output_dir=output_dir, wandb=WandbConfig(enabled=True, samples_interval=2))
    monitor = Monitor(config, WandbSink(config))
    sample = Sample(env_id="reverse-text", prompt="abc", completion="cba", reward=1.0)
    for step in steps:
        monitor.handle(RolloutSamples(step=step, samples=[sample]))
        monitor.handle(report("orchestrator", step, **{"reward/all/mean": step / 10}))
        monitor.handle(report("trainer", step, **{"loss/mean": 1.0 / (step + 1)}))
    monitor.close()
    return monitor


@pytest.mark.slow
def test_offline_run_holds_every_services_metrics_keyed_on_step_and_sample_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_monitor_with_wandb(tmp_path, range(4))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = history_rows(run_dir)
    metric_rows = [r for r in rows if "loss/mean" in r]
    assert [(r["step"], r["reward/all/mean"], r["loss/mean"]) for r in metric_rows] == [
        (0, 0.0, 1.0), (1, 0.1, 0.5), (2, 0.2, 1 / 3), (3, 0.3, 0.25)]
    # Tables every samples_interval (2) steps: at steps 0 and 2, not 1 and 3.
    assert [r["step"] for r in rows if r.get("samples/_type") == "table-file"] == [0, 2]
    assert len(list((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))) == 2


@pytest.mark.slow
def test_a_restarted_monitor_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_monitor_with_wandb(tmp_path, range(2))
    run_id = (tmp_path / "wandb-run-id").read_text()
    run_monitor_with_wandb(tmp_path, range(2, 3))
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(f"-{run_id}" in d.name for d in run_dirs)
    assert [r["step"] for r in history_rows(run_dirs[-1]) if "loss/mean" in r] == [2]
