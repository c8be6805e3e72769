"""Which publication a replica loads next, and when it tells the orchestrator (no sockets)."""

from __future__ import annotations

from rlbus.messages import WeightsAnnounced
from rlbus.services.inference.policy import BASE_STEP, LoadReport, PolicyReporter, PolicyTracker, policy_ref


def announced(step: int, published_at: float) -> WeightsAnnounced:
    return WeightsAnnounced(step=step, manifest=[], num_buckets=1, total_bytes=10, published_at=published_at)


def serving(step: int = BASE_STEP, published_at: float = 0.0) -> PolicyTracker:
    tracker = PolicyTracker()
    tracker.loaded(step, published_at, "base" if step == BASE_STEP else "trainer")
    return tracker


def test_a_new_tracker_is_starting_until_weights_load():
    tracker = PolicyTracker()
    assert (tracker.state, tracker.step, tracker.ready) == ("starting", None, False)
    tracker.loaded(BASE_STEP, 0.0, "base")
    assert (tracker.state, tracker.step, tracker.ready) == ("ready", 0, True)


def test_newer_publications_are_pending_and_the_newest_wins():
    tracker = serving()
    assert tracker.offer(announced(1, 10.0))
    assert tracker.offer(announced(3, 30.0))
    assert not tracker.offer(announced(2, 20.0)), "older than the pending one"
    assert tracker.take_pending().step == 3
    assert tracker.take_pending() is None


def test_what_is_served_or_older_is_not_offered_again():
    tracker = serving(5, 50.0)
    assert not tracker.offer(announced(5, 50.0))
    assert not tracker.offer(announced(4, 40.0)), "a stale WeightsQuery answer"


def test_a_restarted_trainer_republishing_lower_steps_is_followed():
    tracker = serving(10, 100.0)
    assert tracker.offer(announced(8, 200.0)), "resumed from the step-8 checkpoint, published later"
    assert tracker.take_pending().step == 8


def test_a_pending_publication_overtaken_by_a_load_is_dropped():
    tracker = serving()
    tracker.offer(announced(1, 10.0))
    tracker.loaded(2, 20.0, "trainer")
    assert tracker.take_pending() is None


def fail(tracker: PolicyTracker, now: float, error: str = "checksum mismatch on tensor w") -> float | None:
    """Take the pending publication, as a swap does, and report it failed at ``now``."""
    tracker.begin_swap()
    return tracker.failed(tracker.take_pending(), error, now=now)


def test_a_failed_publication_is_retried_after_a_growing_wait_while_the_old_step_serves():
    tracker = serving(1, 10.0)
    tracker.retry_first_s, tracker.retry_max_s = 1.0, 3.0
    bad = announced(2, 20.0)
    tracker.offer(bad)
    assert fail(tracker, now=100.0) == 1.0
    assert (tracker.state, tracker.step) == ("ready", 1)
    assert tracker.last_error == "step 2: checksum mismatch on tensor w" and tracker.num_failed == 1
    assert not tracker.offer(bad), "re-announced (e.g. by a WeightsQuery): still waits for its retry time"
    assert tracker.retry_in(100.5) == 0.5 and not tracker.retry_due(100.5)
    assert tracker.retry_due(101.0) and tracker.take_pending() == bad
    tracker.begin_swap()
    assert [tracker.failed(bad, "timeout", now=t) for t in (110.0, 120.0, 130.0)] == [2.0, 3.0, 3.0]
    assert tracker.retry_due(133.0) and tracker.take_pending() == bad
    tracker.loaded(2, 20.0, "trainer")
    assert tracker.retry_in(200.0) is None, "loaded at last: nothing left to retry"
    tracker.offer(announced(3, 30.0))
    assert fail(tracker, now=300.0) == 1.0, "a new publication starts from the first wait again"


def test_a_newer_publication_supersedes_a_failed_one():
    tracker = serving(1, 10.0)
    tracker.offer(announced(2, 20.0))
    fail(tracker, now=100.0)
    assert tracker.offer(announced(3, 30.0)), "a newer step is not held back by the failed one"
    assert tracker.retry_in(100.0) is None
    assert not tracker.retry_due(1e9) and tracker.take_pending().step == 3


def test_a_failed_restore_of_the_base_weights_is_not_retried():
    tracker = PolicyTracker()
    tracker.begin_swap()
    assert tracker.failed(None, "disk gone", now=1.0) is None
    assert tracker.retry_in(1.0) is None and tracker.last_error == "base weights: disk gone"


def test_reporter_repeats_until_the_served_step_is_acknowledged():
    reporter = PolicyReporter("replica-a", "http://h:1/v1")
    assert reporter.due() is None, "nothing served yet"
    tracker = serving(4, 40.0)
    reporter.served(tracker.served)
    first, again = reporter.due(), reporter.due()
    assert first == again and (first.step, first.replica_id, first.base_url) == (4, "replica-a", "http://h:1/v1")
    assert not reporter.acknowledged(policy_ref(3)), "an Ack for another step does not count"
    assert reporter.due() is not None
    assert reporter.acknowledged(policy_ref(4)) and reporter.due() is None


def test_reporter_starts_again_after_a_swap_or_a_new_orchestrator():
    reporter = PolicyReporter("replica-a", "http://h:1/v1")
    tracker = serving(4, 40.0)
    reporter.served(tracker.served)
    reporter.acknowledged(policy_ref(4))
    reporter.peer_connected()
    assert reporter.due().step == 4
    reporter.acknowledged(policy_ref(4))
    reporter.served(tracker.loaded(5, 50.0, "trainer"))
    assert reporter.due().step == 5


def test_load_report_rates():
    report = LoadReport(ok=True, step=1, num_bytes=200_000_000, fetch_s=1.5, load_s=0.5)
    assert report.seconds == 2.0 and report.mb_per_s == 100.0
    assert LoadReport(ok=False, step=1).mb_per_s == 0.0
