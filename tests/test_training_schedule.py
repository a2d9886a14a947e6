"""The Noam warm-up as the optimiser sees it: step n runs at lr(n), so step 1 is at lr_peak / warmup, not the peak."""
import types

import pytest
import torch
from speechbrain.nnet.schedulers import NoamScheduler

from src.brain import DuplexBrain
from src.run_control import RandomStates

LR_PEAK, WARMUP = 2.5e-4, 100


def brain_stub():
    """Just what `on_fit_batch_start` reads: no frozen parts, a Noam scheduler, an AdamW at the YAML's lr, and
    no random states waiting to be restored."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=LR_PEAK)  # the stage YAMLs construct AdamW at lr_peak
    hparams = types.SimpleNamespace(frozen_modules=[], noam_annealing=NoamScheduler(LR_PEAK, WARMUP))
    brain = object.__new__(DuplexBrain)  # a DuplexBrain without Brain.__init__ (its hooks call their base class)
    brain.__dict__.update(hparams=hparams, parts={}, optimizer=optimizer, weight=weight, random_states=RandomStates())
    return brain


def rates_of_optimizer_steps(brain, batches, accumulation):
    """lr in force at each optimiser update, for `batches` micro-batches with SpeechBrain's should_step rule."""
    rates = []
    for step in range(1, batches + 1):
        should_step = step % accumulation == 0
        DuplexBrain.on_fit_batch_start(brain, None, should_step)
        if should_step:
            rates.append(brain.optimizer.param_groups[0]["lr"])
    return rates


def noam(n):
    return LR_PEAK * WARMUP ** 0.5 * min(n ** -0.5, n * WARMUP ** -1.5)


def test_first_update_is_warmed_up_not_at_peak():
    rates = rates_of_optimizer_steps(brain_stub(), batches=8, accumulation=1)
    assert rates[0] == pytest.approx(LR_PEAK / WARMUP)
    assert rates == pytest.approx([noam(n) for n in range(1, 9)])


def test_scheduler_counts_optimizer_steps_not_micro_batches():
    brain = brain_stub()
    rates = rates_of_optimizer_steps(brain, batches=12, accumulation=4)
    assert brain.hparams.noam_annealing.n_steps == 3
    assert rates == pytest.approx([noam(n) for n in (1, 2, 3)])


def test_rate_peaks_at_the_end_of_warmup():
    rates = rates_of_optimizer_steps(brain_stub(), batches=3 * WARMUP, accumulation=1)
    assert max(rates) == pytest.approx(LR_PEAK)
    assert rates.index(max(rates)) == WARMUP - 1
