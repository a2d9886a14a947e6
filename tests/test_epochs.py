"""TimedEpochCounter: stops between epochs once another would overrun the budget, ends a running epoch early
once the budget is spent (through src.brain.TrainingBrain), and checkpoints like SpeechBrain's EpochCounter (a
recovered counter resumes at the saved epoch)."""
import pytest
import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpointer

from src.brain import TrainingBrain
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


class _TimedBrain(TrainingBrain):
    """The shared training hooks on a one-weight model; each batch moves the fake clock 10 s on."""

    def __init__(self, clock, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.train_losses, self.batches, self.valid_epochs = clock, [], 0, []

    def compute_forward(self, batch, stage):
        return self.modules.weight(batch.float().to(self.device))  # (B, 1)

    def compute_objectives(self, predictions, batch, stage):
        if stage == sb.Stage.TRAIN:
            self.batches += 1
            self.clock.now += 10.0
        return predictions.pow(2).mean()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.VALID:
            self.valid_epochs.append(epoch)


def test_a_spent_budget_ends_the_running_epoch_early_and_fit_after_its_validation(tmp_path):
    """Epochs of 10 batches of 10 s in a 35 s budget: the first epoch stops after its 4th batch (the clock then
    reads 40 s), is validated, and no second epoch starts."""
    clock = FakeClock()
    counter = TimedEpochCounter(limit=5, max_minutes=35 / 60, clock=clock)
    brain = _TimedBrain(clock, modules={"weight": torch.nn.Linear(1, 1)}, opt_class=lambda p: torch.optim.SGD(p, 0.1),
                        hparams={"epoch_counter": counter, "noam_annealing": lambda optimizer: None},
                        run_opts={"device": "cpu", "noprogressbar": True})
    data = [torch.ones(2, 1)] * 10
    brain.fit(counter, data, [torch.ones(2, 1)])
    assert brain.batches == 4 and brain.valid_epochs == [1] and counter.current == 1


def test_without_a_budget_every_batch_runs(tmp_path):
    clock = FakeClock()
    counter = TimedEpochCounter(limit=2, clock=clock)
    brain = _TimedBrain(clock, modules={"weight": torch.nn.Linear(1, 1)}, opt_class=lambda p: torch.optim.SGD(p, 0.1),
                        hparams={"epoch_counter": counter, "noam_annealing": lambda optimizer: None},
                        run_opts={"device": "cpu", "noprogressbar": True})
    brain.fit(counter, [torch.ones(2, 1)] * 10, [torch.ones(2, 1)])
    assert brain.batches == 20 and brain.valid_epochs == [1, 2]
