"""Training mechanics on the tiny YAMLs: overfitting a few utterances, and resuming an interrupted stage."""
import pathlib

import pytest
import torch

from modules.checkpoint import read_model_state
from src.brain import DuplexBrain
from src.stages import run_stage
from tests.training_corpus import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a few short CPU trainings: 30-60 s on 2 cores


def stage_argv(stage, data, out, *extra):
    return [str(ROOT / "hparams" / "tiny" / f"train_stage{stage}.yaml"), f"--data_folder={data}",
            f"--output_folder={out}", "--device=cpu", "--noprogressbar", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("loop") / "corpus")


def test_training_loss_falls_well_below_its_start(corpus, tmp_path):
    """Stage 2 (adapter + LM trained) on 3 utterances: the loss must drop far below the first batches'.

    Without label smoothing (its uniform term alone keeps a smoothed CE over 50k classes high) and without
    speed perturbation, so that the same inputs come back every epoch.
    """
    brain = run_stage(DuplexBrain, stage_argv(
        2, corpus, tmp_path / "overfit", "--number_of_epochs=10", "--init_from={folder: null}",
        "--trained_modules=[adapter, lm, normalizer]", "--frozen_modules=[cnn, encoder]",
        "--label_smoothing=0.0", "--speed_perturb=null", "--lr_peak=0.01", "--keep_checkpoints=1",
        "--test_max_new_tokens=0", "--train_dataloader_opts={batch_size: 3}"))
    losses = brain.train_losses  # one full batch of the 3 utterances per step
    start, end = losses[0], losses[-1]
    assert end < 0.25 * start, f"loss went from {start:.2f} to {end:.2f}"


class Interrupted(RuntimeError):
    """Stands for the process being killed."""


class KilledAfterTwoSteps(DuplexBrain):
    def on_fit_batch_start(self, batch, should_step):
        if self.optimizer_step == 2:
            raise Interrupted
        super().on_fit_batch_start(batch, should_step)


class RecordsResumedWeights(DuplexBrain):
    def on_fit_start(self):
        super().on_fit_start()
        self.resumed_state = {k: v.clone() for k, v in self.hparams.model.state_dict().items()}
        self.resumed_optimizer_step = self.optimizer_step
        self.resumed_noam_steps = self.hparams.noam_annealing.n_steps


def test_resume_continues_steps_and_weights_without_reloading_previous_stage(corpus, tmp_path):
    run_stage(DuplexBrain, stage_argv(1, corpus, tmp_path / "stage1", "--number_of_epochs=1"))
    stage2 = stage_argv(2, corpus, tmp_path / "stage2", f"--previous_output_folder={tmp_path / 'stage1'}",
                        "--ckpt_interval_steps=1", "--train_dataloader_opts={batch_size: 1, shuffle: True}")
    with pytest.raises(Interrupted):
        run_stage(KilledAfterTwoSteps, stage2)
    saved = list((tmp_path / "stage2" / "save").glob("CKPT+*"))
    assert len(saved) == 1, "one intra-epoch checkpoint (after step 2) expected"
    at_kill = read_model_state(saved[0])

    brain = run_stage(RecordsResumedWeights, stage2)
    assert brain.resumed_optimizer_step == 2 and brain.resumed_noam_steps == 2
    assert all(torch.equal(brain.resumed_state[key], at_kill[key]) for key in at_kill)
    previous = read_model_state(tmp_path / "stage1" / "save")
    assert any(not torch.equal(previous[key], at_kill[key]) for key in at_kill if key.startswith("2."))
    # 3 training rows x 2 epochs at batch 1: the resumed run finishes the remaining 4 steps, not 6 more
    assert brain.optimizer_step == 6 and brain.hparams.noam_annealing.n_steps == 6
    # the intra-epoch checkpoint is gone: the next stage averages end-of-epoch checkpoints only
    finished = brain.checkpointer.list_checkpoints()
    assert len(finished) == 2 and all(ckpt.meta["end-of-epoch"] for ckpt in finished)
