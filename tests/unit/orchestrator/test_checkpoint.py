"""Progress files: atomic writes, pruning, resume by step or latest."""

import pytest

from rlbus.services.orchestrator.checkpoint import ProgressState, ProgressStore
from rlbus.services.orchestrator.sampler import Draw, SamplerState


def state(step: int) -> ProgressState:
    return ProgressState(step=step, total_samples=10 * step, total_tokens=100 * step, total_problems=step,
                         sampler=SamplerState(num_draws=step, epochs=[1], positions=[2]), pending=[Draw(0, 3)])


def test_save_then_load_round_trips_and_leaves_no_temp_file(tmp_path):
    store = ProgressStore(tmp_path / "orchestrator")
    store.save(state(4))
    loaded = store.load(4)
    assert loaded.step == 4 and loaded.sampler.positions == [2] and loaded.pending == [Draw(0, 3)]
    assert loaded.saved_at > 0
    assert [p.name for p in (tmp_path / "orchestrator").iterdir()] == ["step_4.json"]


def test_latest_and_pruning(tmp_path):
    store = ProgressStore(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        store.save(state(step))
    assert store.steps() == [4, 6]
    assert store.load(-1).step == 6
    assert store.load(None) is None


def test_missing_step_names_what_exists(tmp_path):
    store = ProgressStore(tmp_path)
    store.save(state(2))
    with pytest.raises(ValueError, match=r"no orchestrator progress for step 3 .* saved steps: \[2\]"):
        store.load(3)
    assert ProgressStore(tmp_path / "empty").load(-1) is None
