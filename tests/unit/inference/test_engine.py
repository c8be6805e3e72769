"""Reports of tensor-parallel workers merged into one (no engine needed)."""

from rlbus.services.inference.engine import merge_reports
from rlbus.services.inference.policy import LoadReport


def ok(fetch_s: float) -> LoadReport:
    return LoadReport(ok=True, step=2, num_bytes=100, fetch_s=fetch_s, load_s=0.5)


def refused(kind: str = "transfer") -> LoadReport:
    return LoadReport(ok=False, step=2, num_bytes=100, error="checksum mismatch", kind=kind)


def test_every_worker_loaded_means_ok_timed_by_the_slowest():
    merged = merge_reports([ok(1.0), ok(3.0)])
    assert (merged.ok, merged.kind, merged.fetch_s, merged.seconds) == (True, "", 3.0, 3.5)


def test_all_workers_refusing_is_a_clean_refusal():
    merged = merge_reports([refused(), refused()])
    assert (merged.ok, merged.kind, merged.error) == (False, "transfer", "checksum mismatch")


def test_some_workers_loading_while_others_refused_is_a_broken_load():
    assert merge_reports([ok(1.0), refused()]).kind == "load"
    assert merge_reports([refused(), refused("load")]).kind == "load"
