"""An epoch counter with a wall-clock budget, for runs that must end inside a fixed lease (a lent GPU, a CI job).

SpeechBrain's `EpochCounter` stops after `limit` epochs. `TimedEpochCounter` also stops *before* an epoch that
would end past `max_minutes` from the first epoch's start, judging by the mean length of the epochs run so far
in this process. An epoch already running when the budget is spent ends early at its next batch
(`out_of_time`, read by `src.brain.TrainingBrain`): its validation, checkpoint and the test pass still run, which
a `timeout` kill would lose. The budget counts from this process's first epoch, so a resumed run gets it again.
"""
import logging
import time

from speechbrain.utils.epoch_loop import EpochCounter

logger = logging.getLogger(__name__)


class TimedEpochCounter(EpochCounter):
    """`EpochCounter(limit)` that also ends when the next epoch would not fit in `max_minutes` (None: no budget).

    Saves and recovers exactly like `EpochCounter` (the hooks are inherited), so it can replace it in a YAML.
    """

    def __init__(self, limit, max_minutes=None, clock=time.monotonic):
        super().__init__(limit)
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"TimedEpochCounter: max_minutes must be positive or null; got {max_minutes}.")
        self.max_minutes = max_minutes
        self._clock = clock
        self._started = None  # clock reading at the first epoch of this process
        self._epochs_run = 0  # epochs started in this process (each has ended when the next one is asked for)

    def out_of_time(self) -> bool:
        """Whether the budget is spent: the epoch in progress should stop taking batches."""
        return (self.max_minutes is not None and self._started is not None
                and self._clock() - self._started >= 60.0 * self.max_minutes)

    def __next__(self):
        now = self._clock()
        if self._started is None:
            self._started = now
        elif self.max_minutes is not None:
            elapsed = now - self._started
            mean_epoch = elapsed / self._epochs_run
            if elapsed + mean_epoch > 60.0 * self.max_minutes:
                logger.info("Stopping after epoch %d: another epoch (~%.0f s) would end past the %.1f-minute "
                            "budget (%.0f s used)", self.current, mean_epoch, self.max_minutes, elapsed)
                raise StopIteration
        epoch = super().__next__()
        self._epochs_run += 1
        return epoch
