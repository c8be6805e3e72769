import math

import pytest

from rlbus.services.trainer.config import SchedulerConfig
from rlbus.services.trainer.schedule import LRSchedule


def test_constant_with_linear_warmup():
    schedule = LRSchedule(1e-3, SchedulerConfig(type="constant", warmup_steps=4), max_steps=None)
    assert [schedule.lr(s) for s in (1, 2, 4, 5, 1000)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_linear_decays_to_the_floor_at_max_steps():
    schedule = LRSchedule(1.0, SchedulerConfig(type="linear", warmup_steps=2, min_lr_ratio=0.1), max_steps=12)
    assert schedule.lr(2) == 1.0
    assert schedule.lr(7) == pytest.approx(1 - 0.9 * 0.5)
    assert schedule.lr(12) == pytest.approx(0.1)


def test_cosine_passes_half_way_at_the_midpoint():
    schedule = LRSchedule(2.0, SchedulerConfig(type="cosine"), max_steps=10)
    assert schedule.lr(0) == 2.0
    assert schedule.lr(5) == pytest.approx(1.0)
    assert schedule.lr(10) == pytest.approx(0.0, abs=1e-12)
    assert schedule.lr(3) == pytest.approx(1.0 + math.cos(math.pi * 0.3))


def test_decay_without_max_steps_is_a_user_error():
    with pytest.raises(ValueError, match="scheduler.type = 'cosine' decays towards max_steps"):
        LRSchedule(1.0, SchedulerConfig(type="cosine"), max_steps=None)
    with pytest.raises(ValueError, match="warmup_steps = 20 exceeds max_steps = 10"):
        LRSchedule(1.0, SchedulerConfig(warmup_steps=20), max_steps=10)
