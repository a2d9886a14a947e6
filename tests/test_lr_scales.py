"""`lr_scales` in a stage YAML: a trained part learns at a multiple of the Noam rate (src/brain.py)."""
import pathlib

import pytest
import torch
from speechbrain.nnet.schedulers import NoamScheduler
from torch import nn

from src.brain import DuplexBrain, apply_lr_scales, scaled_param_groups
from src.stages import run_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"


def _parts():
    torch.manual_seed(0)
    return nn.ModuleDict({"adapter": nn.Linear(4, 4), "lm": nn.Linear(4, 4), "encoder": nn.Linear(4, 4)})


def test_groups_partition_every_parameter_once_with_the_base_group_first():
    parts = _parts()
    groups = scaled_param_groups(parts, parts.parameters(), {"lm": 0.1, "adapter": 1.0, "encoder": 1.0},
                                 ["adapter", "lm"])  # the encoder is frozen: at factor 1 that is allowed
    assert [group["lr_scale"] for group in groups] == [1.0, 0.1]
    ids = [id(param) for group in groups for param in group["params"]]
    assert sorted(ids) == sorted(id(param) for param in parts.parameters())  # each once, none left out
    assert {id(param) for param in groups[1]["params"]} == {id(param) for param in parts["lm"].parameters()}


def test_one_adam_step_moves_a_scaled_part_by_its_share_of_the_noam_rate():
    """Adam's first step moves each weight by about its group's rate (m / sqrt(v) = sign of the gradient), so
    the LM at scale 0.25 must move a quarter as far as the adapter, at the rate the scheduler gave."""
    parts = _parts()
    groups = scaled_param_groups(parts, parts.parameters(), {"lm": 0.25}, ["adapter", "lm", "encoder"])
    optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
    scheduler = NoamScheduler(lr_initial=0.01, n_warmup_steps=4)
    before = {name: part.weight.detach().clone() for name, part in parts.items()}
    scheduler(optimizer)
    apply_lr_scales(optimizer)
    rate = 0.01 * scheduler._get_lr_scale()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(rate)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.25 * rate)
    sum(part(torch.ones(2, 4)).sum() for part in parts.values()).backward()
    optimizer.step()
    moved = {name: (part.weight.detach() - before[name]).abs().max().item() for name, part in parts.items()}
    assert moved["adapter"] == pytest.approx(rate, rel=1e-3)
    assert moved["encoder"] == pytest.approx(rate, rel=1e-3)
    assert moved["lm"] == pytest.approx(0.25 * rate, rel=1e-3)
    scheduler(optimizer)  # the next step: the scheduler resets every group, the scale is applied again
    apply_lr_scales(optimizer)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.25 * optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("scales, message", [
    ({"lm": 0.1}, "are not trained"),  # the LM is frozen here
    ({"decoder": 1.0}, "are no parts"),
    ({"adapter": 0.0}, "must be above 0"),
])
def test_a_scale_that_would_do_nothing_is_refused(scales, message):
    """A frozen part may be listed at factor 1 (the YAMLs list every part), at no other."""
    parts = _parts()
    with pytest.raises(ValueError, match=message):
        scaled_param_groups(parts, parts.parameters(), scales, ["adapter", "encoder"])


class RecordsLM(DuplexBrain):
    def on_fit_start(self):
        super().on_fit_start()
        self.lm_before = {k: v.clone() for k, v in self.parts["lm"].state_dict().items()}


@pytest.mark.slow  # two tiny CPU trainings
def test_tiny_stage1_trains_the_lm_at_its_scale_and_resumes_with_it(tmp_path):
    """Stage 1 with the LM trained at a tenth of the rate: the optimiser holds the two groups at the scaled
    rates, the LM moved, and a resumed run (one more epoch) restores the groups' scale from its checkpoint."""
    def argv(epochs):
        return [str(ROOT / "hparams" / "tiny" / "train_stage1.yaml"), f"--data_folder={SAMPLE}",
                f"--output_folder={tmp_path / 'out'}", "--device=cpu", "--noprogressbar",
                f"--number_of_epochs={epochs}", "--trained_modules=[cnn, encoder, adapter, normalizer, lm]",
                "--frozen_modules=[]", "--lr_scales={lm: 0.1}", "--test_max_new_tokens=0"]

    brain = run_stage(RecordsLM, argv(1))
    base, lm_group = brain.optimizer.param_groups
    assert lm_group["lr"] == pytest.approx(0.1 * base["lr"]) and lm_group["lr_scale"] == 0.1
    assert base["lr"] == pytest.approx(brain.hparams.lr_peak * brain.hparams.noam_annealing._get_lr_scale())
    after = brain.parts["lm"].state_dict()
    assert any(not torch.equal(after[k], v) for k, v in brain.lm_before.items())

    resumed = run_stage(RecordsLM, argv(2))
    assert resumed.optimizer_step > brain.optimizer_step  # it went on, from the saved steps
    assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * resumed.optimizer.param_groups[0]["lr"])
