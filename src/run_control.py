"""What makes a stopped stage resume exactly where it stopped: random states in every checkpoint, and a graceful
stop on SIGINT/SIGTERM.

Bit-exact resume needs every source of randomness to continue as if the run had not stopped:

* the global generators (Python `random`, NumPy, torch CPU, every CUDA device): speed perturbation and dropout
  draw from torch's. `RandomStates` saves them in each checkpoint (one file per process under DDP) and restores
  them on recovery. After an *intra-epoch* checkpoint the restore waits for the first resumed batch (or the
  validation pass, when the checkpoint closed the epoch's training): the resumed run creates the training
  DataLoader iterator after recovery, and that draws a base seed from torch's generator, which the
  uninterrupted run did at the start of the epoch, before the checkpoint;
* the samplers: SpeechBrain's shuffling samplers seed themselves with seed + epoch and the DataLoader skips the
  batches already done, so they need no state;
* the data pipeline: the instruction drawn for a training sample comes from a generator seeded with (seed,
  epoch, utterance id) (`PromptDraws` in src/stages.py), so it needs no state either, and stays the same with
  DataLoader workers, which only ever see a copy of the parent's generators.

`GracefulStop`: the first SIGINT/SIGTERM during training lets the current step finish, saves an intra-epoch
checkpoint and ends the run with a one-line message and exit status 128 + signal (no traceback); outside
training (data checks, test) the run ends at once, as nothing is lost there. A second signal ends it at once.
"""
import contextlib
import logging
import pathlib
import random
import signal
import threading

import numpy as np
import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
from speechbrain.utils.distributed import get_rank

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def capture_random_states():
    """Every global generator's state, as one picklable dict."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStates:
    """Checkpoint recoverable for the global random generators (see the module docstring for the timing)."""

    def __init__(self):
        self.pending = None  # states read from an intra-epoch checkpoint, applied by `apply_pending`

    @mark_as_saver
    def save(self, path):
        torch.save(capture_random_states(), _rank_file(path))

    @mark_as_loader
    def load(self, path, end_of_epoch):
        file = _rank_file(path)
        if not file.is_file():  # a checkpoint written by more processes than now: rank 0's states
            file = pathlib.Path(path)
        states = torch.load(file, map_location="cpu", weights_only=False)
        if end_of_epoch:
            restore_random_states(states)
        else:
            self.pending = states

    def apply_pending(self):
        """Restore the states of an intra-epoch checkpoint at the point where that checkpoint was taken."""
        if self.pending is not None:
            restore_random_states(self.pending)
            self.pending = None


# Every process saves its own states (the hooks above run on all ranks, not only the main one).
register_checkpoint_hooks(RandomStates, save_on_main_only=False)


def _rank_file(path):
    """Rank 0 writes the recoverable's own file; rank r > 0 a sibling `<name>.rank<r>.ckpt`."""
    path = pathlib.Path(path)
    rank = get_rank() or 0
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class TrainingStopped(Exception):
    """Raised after the checkpoint that a stop signal asked for has been saved."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopNow(KeyboardInterrupt):
    """A stop signal outside training, or a second one: end without saving (a KeyboardInterrupt, so that code
    that cleans up on Ctrl-C does so)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """SIGINT/SIGTERM handling for one stage run; `in_training` is set by the Brain around `fit`."""

    def __init__(self):
        self.signum = None
        self.in_training = False

    @property
    def requested(self):
        return self.signum is not None

    def handle(self, signum, frame):
        if self.requested or not self.in_training:
            raise StopNow(signum)
        self.signum = signum
        logger.warning("%s received: finishing this step, saving a checkpoint, then stopping (send it again to "
                       "stop at once, without saving).", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self):
        """Handlers for the run's duration (only the main thread can install them; elsewhere: none)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
