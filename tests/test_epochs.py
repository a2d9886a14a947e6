"""TimedEpochCounter: stops between epochs once another would overrun the budget, and checkpoints like
SpeechBrain's EpochCounter (a recovered counter resumes at the saved epoch)."""
import pytest
from speechbrain.utils.checkpoints import Checkpointer

from src.epochs import TimedEpochCounter


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_epochs(counter, clock, seconds_per_epoch):
    epochs = []
    for epoch in counter:
        epochs.append(epoch)
        clock.now += seconds_per_epoch
    return epochs


def test_stops_before_an_epoch_that_would_overrun():
    clock = FakeClock()
    counter = TimedEpochCounter(limit=100, max_minutes=1.0, clock=clock)  # 60 s, epochs of 25 s
    assert run_epochs(counter, clock, 25.0) == [1, 2]  # a third would end at 75 s
    assert counter.current == 2


def test_epoch_limit_still_applies_and_no_budget_means_none():
    clock = FakeClock()
    assert run_epochs(TimedEpochCounter(limit=3, max_minutes=10.0, clock=clock), clock, 1.0) == [1, 2, 3]
    assert run_epochs(TimedEpochCounter(limit=4, clock=clock), clock, 1e6) == [1, 2, 3, 4]


def test_first_epoch_always_runs():
    clock = FakeClock()
    assert run_epochs(TimedEpochCounter(limit=5, max_minutes=0.01, clock=clock), clock, 100.0) == [1]


def test_checkpoint_round_trip(tmp_path):
    clock = FakeClock()
    counter = TimedEpochCounter(limit=10, max_minutes=1.0, clock=clock)
    checkpointer = Checkpointer(tmp_path, {"counter": counter})
    for _ in counter:
        clock.now += 25.0
        checkpointer.save_checkpoint()
    resumed = TimedEpochCounter(limit=10, max_minutes=1.0, clock=clock)
    Checkpointer(tmp_path, {"counter": resumed}).recover_if_possible()
    assert resumed.current == counter.current == 2
    assert next(resumed) == 3  # a resumed run gets the budget again


def test_rejects_non_positive_budget():
    with pytest.raises(ValueError, match="max_minutes"):
        TimedEpochCounter(limit=1, max_minutes=0)
